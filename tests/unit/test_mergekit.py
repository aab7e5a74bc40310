import pytest

from orchestrator.config.mergekit import from_mergekit
from orchestrator.config.schema import config_from_dict
from orchestrator.errors import ConfigError


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
                       "tokenizer": {"source": "base", "tokens": {"<x>": {}}},
                       "foo": 1, "models": [{"model": "a+lora"}]})
    text = str(e.value)
    for want in ("foo: unknown mergekit key", "models, slices: give exactly one of them",
                 "tokenizer, tokenizer_source: give one of them"):
        assert want in text
    with pytest.raises(ConfigError) as e:
        from_mergekit({"merge_method": "linear", "models": [{"model": "a+lora"}]})
    assert "models[0].model: LoRA adapters" in str(e.value)
    with pytest.raises(ConfigError, match="tokenizer: tokens not supported"):
        from_mergekit({"merge_method": "linear", "models": ["a"],
                       "tokenizer": {"source": "union", "tokens": {"<x>": {}}}})
    with pytest.raises(ConfigError) as e:
        from_mergekit({"merge_method": "linear", "slices": [
            {"sources": [{"model": "a", "layer_range": [0, 2]}], "residual_weight": 0.1,
             "base_model": "z"}]})
    assert "slices[0].residual_weight: not supported" in str(e.value)
    assert "slices[0].base_model: a slice's own base model" in str(e.value)


def test_filters_and_gradients_become_settings():
    """mergekit's `filter` is a substring test: a glob *f*; "*" (or none) matches all; glob
    characters in a filter are matched literally through an escaped regex."""
    native = from_mergekit({
        "models": [{"model": "a", "parameters": {"weight": [0.1, 0.9]}}, {"model": "b"}],
        "merge_method": "linear",
        "parameters": {"weight": [{"filter": "self_attn", "value": [0, 1]},
                                  {"filter": "*", "value": 0.5}],
                       "normalize": {"filter": "x[1]", "value": False}},
    })
    assert native["sources"][0]["params"] == {"weight": [0.1, 0.9]}
    assert native["merge"]["params"] == {
        "weight": [{"tensors": "*self_attn*", "value": [0, 1]}, {"value": 0.5}],
        "normalize": [{"tensors": "re:x\\[1\\]", "value": False}]}


def test_slices_keep_layers_params_and_base_role():
    doc = {"slices": [{"sources": [{"model": "m/a", "layer_range": [0, 2],
                                    "parameters": {"density": 0.5}},
                                   {"model": "m/base", "layer_range": [0, 2]}],
                       "parameters": {"weight": 0.3}}],
           "base_model": "m/base", "merge_method": "ties", "dtype": "float32"}
    cfg = convert(doc)
    assert cfg.base.name == "base" and [s.name for s in cfg.sources] == ["a"]
    (sl,) = cfg.slices
    assert [(s.source, s.layers, s.params) for s in sl.sources] == [
        ("a", [0, 2], {"density": 0.5}), ("base", [0, 2], {})]
    assert sl.params == {"weight": 0.3}
    doc.update(merge_method="slerp", parameters={"t": 0.5})
    doc["slices"][0]["sources"][0]["parameters"] = {}
    doc["slices"][0]["parameters"] = {}
    cfg = convert(doc)  # slerp: the base is the first model of every slice
    assert cfg.base is None and [s.source for s in cfg.slices[0].sources] == ["base", "a"]
