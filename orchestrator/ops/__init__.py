"""Operating merges: periodic re-merges (``raymerge schedule``), cron, Kubernetes,
job submission."""
