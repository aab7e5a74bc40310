import glob
import os

import pytest
import yaml

from orchestrator.config.schema import apply_overrides, config_from_dict, load_config, parse_bytes
from orchestrator.errors import ConfigError
from orchestrator.ops.schedule import load_schedules
from workers.merge import METHODS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def job(**changes):
    doc = {
        "base": {"name": "base", "uri": "/models/base"},
        "sources": [{"name": "a", "uri": "/models/a"}, {"name": "b", "uri": "/models/b"}],
        "merge": {"method": "ties", "params": {"density": 0.3}},
        "output": {"uri": "/out"},
    }
    doc.update(changes)
    return doc


def errors_of(doc):
    with pytest.raises(ConfigError) as e:
        config_from_dict(doc)
    return e.value.errors


def test_valid_job_becomes_typed_config():
    """A valid document yields typed dataclasses with defaults filled in."""
    cfg = config_from_dict(job())
    assert cfg.merge.method == "ties" and cfg.merge.params == {"density": 0.3}
    assert cfg.sources[1].name == "b" and cfg.base.uri == "/models/base"
    assert cfg.compute_dtype == "float32" and cfg.runtime.executor == "ray"
    assert parse_bytes(cfg.output.shard_size) == 10**9


def test_all_errors_reported_at_once_with_full_paths():
    """Every problem in one ConfigError, each prefixed by its key path with list indices."""
    doc = job(
        sources=[{"name": "a", "uri": "/a", "params": {"weight": "heavy", "densty": 1}},
                 {"name": "a", "uri": 3}, {"uri": "/c"}],
        merge={"method": "ties", "params": {"density": 1.5, "trim_scope": "layer"},
               "overrides": [{"tensors": "re:([", "params": {"scale": "x"}}]},
        output={"uri": "/o", "shard_size": "lots", "dtype": "float8"},
        runtime={"num_workers": 0, "bogus": 1},
        compute_dtype="int4",
    )
    errs = errors_of(doc)
    expected = [
        "sources[1].uri: expected a string",
        "sources[2].name: missing required key",
        "sources[0].params.weight: expected a number, got 'heavy'",
        "sources[0].params.densty: unknown per-model parameter of 'ties'",
        "sources[1].name: 'a' is already used by sources[0]",
        "merge.params.density: expected <= 1, got 1.5",
        "merge.params.trim_scope: expected one of global, tensor, got 'layer'",
        "merge.overrides[0].tensors: invalid regex",
        "merge.overrides[0].params.scale: expected a number",
        "output.shard_size: expected a size like 512MB",
        "output.dtype: expected one of",
        "runtime.bogus: unknown key",
        "runtime.num_workers: expected >= 1, got 0",
        "compute_dtype: expected one of",
    ]
    for want in expected:
        assert any(e.startswith(want) for e in errs), (want, errs)
    assert len(errs) == len(expected), errs


def test_unknown_method_lists_valid_ones():
    errs = errors_of(job(merge={"method": "tie"}))
    assert errs == ["merge.method: unknown method 'tie'; valid methods: "
                    + ", ".join(sorted(METHODS))]
    assert "ties" in METHODS and "linear" in METHODS


def test_method_requirements_checked():
    """A base is required where the method needs one; slerp takes exactly two models."""
    assert errors_of(job(base=None)) == [
        "base: method 'ties' needs a base model (the common ancestor)"]
    three = [{"name": n, "uri": n} for n in "xyz"]
    assert errors_of(job(sources=three, merge={"method": "slerp"})) == [
        "sources: method 'slerp' merges exactly 2 models, got 3"]


def test_params_raymerge_sets_are_refused():
    """Internal params (a layer's depth, solved transforms) come from raymerge, not the YAML;
    they are not offered as valid names either."""
    doc = job(merge={"method": "lines", "params": {"position": 0.5},
                     "overrides": [{"tensors": "*", "params": {"alpha": 0.1}}]})
    assert errors_of(doc) == ["merge.params.position: set by raymerge, not by the config"]
    doc = job(merge={"method": "lines", "params": {"depth": 0.5}})
    assert "position" not in errors_of(doc)[0] and "alpha" in errors_of(doc)[0]


def test_weights_adding_to_zero_are_refused_when_normalizing():
    doc = job(merge={"method": "linear", "params": {"weight": 1.0}})
    doc["sources"][1]["params"] = {"weight": -1.0}
    assert errors_of(doc)[0].startswith("merge.params.weight: the model weights [1.0, -1.0]")


def test_dotlist_overrides_reach_nested_keys_and_list_items():
    doc = apply_overrides(job(), ["merge.params.density=0.5", "sources[1].uri=/elsewhere",
                                  "runtime.num_workers=4", "output.dtype=bfloat16"])
    cfg = config_from_dict(doc)
    assert cfg.merge.params["density"] == 0.5 and cfg.sources[1].uri == "/elsewhere"
    assert cfg.runtime.num_workers == 4 and cfg.output.dtype == "bfloat16"
    with pytest.raises(ConfigError, match=r"sources has no index 5"):
        apply_overrides(job(), ["sources[5].uri=/x"])
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides(job(), ["novalue"])


def test_byte_sizes():
    assert parse_bytes("512MB") == 512 * 10**6 and parse_bytes("2GiB") == 2 * 2**30
    assert parse_bytes(1234) == 1234 and parse_bytes("1.5 kb") == 1500
    with pytest.raises(ValueError):
        parse_bytes("big")


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("merge: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("path", sorted(
    glob.glob(os.path.join(ROOT, "configs", "**", "*.y*ml"), recursive=True)))
def test_every_example_config_loads(path):
    """Every YAML under configs/ (recursively) validates: jobs (mergekit ones with an output)
    and schedules files, whose jobs load too."""
    with open(path) as f:
        doc = yaml.safe_load(f)
    if "schedules" in doc:
        file = load_schedules(path)
        assert all(load_config(s.job).merge.method for s in file.schedules)
        return
    cfg = load_config(path, output="/tmp/out" if "merge_method" in doc else None)
    assert cfg.merge.method


def test_example_configs_exist():
    assert len(glob.glob(os.path.join(ROOT, "configs", "**", "*.y*ml"), recursive=True)) >= 8


def test_push_to_hub_needs_a_repo_id_and_a_local_output():
    assert errors_of(job(output={"uri": "/o", "push_to_hub": "no-slash"})) == [
        "output.push_to_hub: expected a repository id like org/name, got 'no-slash'"]
    assert errors_of(job(output={"uri": "s3://b/x", "push_to_hub": "org/name"})) == [
        "output.push_to_hub: needs a local output folder (output.uri is on S3)"]
