import pytest

from orchestrator.config import config_from_dict
from orchestrator.errors import ConfigError
from orchestrator.mergekit import from_mergekit


def convert(doc):
    native = from_mergekit(doc)
    native.setdefault("output", {})["uri"] = "/out"
    return config_from_dict(native)


def test_ties_keeps_mergekit_semantics():
    """mergekit ties: per-tensor trim, density default 1, base excluded from the models,
    lambda -> scale, per-model parameters on the sources, dtype -> compute dtype."""
    cfg = convert({
        "models": [{"model": "m/base"}, {"model": "m/a", "parameters": {"weight": 0.3,
                                                                       "density": 0.5}},
                   {"model": "m/b", "parameters": {"weight": 0.7}}],
        "base_model": "m/base", "merge_method": "ties",
        "parameters": {"normalize": True, "int8_mask": True, "lambda": 0.9},
        "dtype": "float32", "out_dtype": "bfloat16",
    })
    assert cfg.base.uri == "m/base" and [s.uri for s in cfg.sources] == ["m/a", "m/b"]
    assert cfg.merge.params == {"density": 1.0, "trim_scope": "tensor", "normalize": True,
                                "scale": 0.9}
    assert cfg.sources[0].params == {"weight": 0.3, "density": 0.5}
    assert cfg.compute_dtype == "float32" and cfg.output.dtype == "bfloat16"


def test_slerp_puts_base_first_and_linear_ignores_base():
    cfg = convert({"models": [{"model": "x/b"}, {"model": "x/a"}], "base_model": "x/a",
                   "merge_method": "slerp", "parameters": {"t": 0.3}})
    assert [s.uri for s in cfg.sources] == ["x/a", "x/b"] and cfg.base is None
    cfg = convert({"models": ["x/a", "y/a"], "base_model": "x/a", "merge_method": "linear"})
    assert [s.name for s in cfg.sources] == ["a", "a-2"] and cfg.base is None


def test_dare_rescale_maps_to_l1():
    cfg = convert({"models": [{"model": "a"}], "base_model": "b", "merge_method": "dare_ties",
                   "parameters": {"rescale": False}})
    assert cfg.merge.params["rescale"] == "none"
    cfg = convert({"models": [{"model": "a"}], "base_model": "b", "merge_method": "dare_linear"})
    assert cfg.merge.params["rescale"] == "l1"


def test_unsupported_features_are_refused_not_ignored():
    with pytest.raises(ConfigError) as e:
        from_mergekit({"slices": [], "merge_method": "slerp", "tokenizer_source": "union",
                       "parameters": {"t": [0, 0.5, 1]}, "foo": 1,
                       "models": [{"model": "a+lora"}]})
    text = str(e.value)
    for want in ("foo: unknown mergekit key", "slices: mergekit slices are not supported yet",
                 "tokenizer_source: only 'base'", "models[0].model: LoRA adapters"):
        assert want in text
