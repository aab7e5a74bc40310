import pytest

from orchestrator.config.schema import config_from_dict
from orchestrator.config.tensor_params import evaluate
from orchestrator.errors import ConfigError


def test_scalars_and_gradients():
    """A gradient is read at t: ends exact, linear in between (mergekit's arithmetic)."""
    assert evaluate(0.3, "x", 0.7) == 0.3
    grad = [0.0, 0.5, 0.3, 0.7, 1.0]
    assert evaluate(grad, "x", 0.0) == 0.0 and evaluate(grad, "x", 1.0) == 1.0
    assert evaluate(grad, "x", 0.5) == 0.3
    assert evaluate(grad, "x", 0.125) == pytest.approx(0.25)
    assert evaluate([True, False], "x", 0.4) is True  # picked, not interpolated
    assert evaluate(["a", "b", "c"], "x", 1.0) == "c"


def test_conditions_first_match_else_nothing():
    cond = [{"tensors": "*self_attn*", "value": [0, 1]}, {"tensors": "re:mlp\\.up", "value": 2},
            {"value": 9}]
    assert evaluate(cond, "model.layers.0.self_attn.q_proj.weight", 0.5) == 0.5
    assert evaluate(cond, "model.layers.0.mlp.up_proj.weight", 0.5) == 2
    assert evaluate(cond, "model.norm.weight", 0.0) == 9
    assert evaluate(cond[:2], "model.norm.weight", 0.0) is None  # falls through to next scope


def _doc(params, **extra):
    return {"sources": [{"name": "a", "uri": "/a"}, {"name": "b", "uri": "/b"}],
            "merge": {"method": "linear", "params": params}, "output": {"uri": "/o"}, **extra}


def test_settings_are_validated_element_by_element():
    with pytest.raises(ConfigError) as e:
        config_from_dict(_doc({"normalize": [True, "x"],
                               "weight": [{"tensors": "re:(", "value": 1},
                                          {"value": [{"value": 1}]}, {"valeu": 2}]}))
    text = str(e.value)
    for want in ("merge.params.normalize[1]: expected true or false",
                 "merge.params.weight[0].tensors: invalid regex",
                 "merge.params.weight[1].value: conditions cannot be nested",
                 "merge.params.weight[2]: unknown keys valeu",
                 "merge.params.weight[2].value: missing required key"):
        assert want in text, text


def test_slices_are_validated():
    doc = _doc({}, slices=[
        {"sources": [{"source": "a", "layers": [0, 2]}, {"source": "c", "layers": [0, 3]}]},
        {"sources": [{"source": "b", "layers": [3, 1]}], "params": {"wieght": 1}},
    ])
    with pytest.raises(ConfigError) as e:
        config_from_dict(doc)
    text = str(e.value)
    for want in ("slices[0].sources[1].source: 'c' is not the name of a source",
                 "slices[0].sources: every source of a slice gives the same number of layers",
                 "slices[1].sources[0].layers: expected [start, end) with 0 <= start < end",
                 "slices[1].params.wieght: unknown parameter of 'linear'"):
        assert want in text, text
