"""The job schema and what feeds it: mergekit YAML import and per-tensor parameter values."""
