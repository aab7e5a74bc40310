import pytest

from orchestrator.config.schema import config_from_dict
from orchestrator.errors import PlanError
from orchestrator.planning.plan import describe, make_plan, natural_key
from workers.io.index import CheckpointIndex, TensorLocation
from workers.io.safetensors_io import TensorInfo

LAYERS = 12


def fake_index(name, dtype="F32", width=64):
    """An index of a 12-layer model without any file: plans never read tensor bytes."""
    tensors, offset = {}, 8
    names = ["embed.weight", "norm.weight", "ids"] + [
        f"layers.{i}.{p}" for i in range(LAYERS) for p in ("attn.weight", "mlp.weight", "ln.bias")]
    for n in names:
        shape = (4,) if n == "ids" else (width,) if n.endswith("bias") or n.startswith("norm") \
            else (width, width)
        code = "I64" if n == "ids" else dtype
        size = 8 * 4 if n == "ids" else (width * width if len(shape) == 2 else width) * 4
        if code == "BF16":
            size //= 2
        tensors[n] = TensorLocation("model.safetensors", TensorInfo(code, shape, offset,
                                                                    offset + size))
        offset += size
    return CheckpointIndex(name, f"/fake/{name}", tensors, ("model.safetensors",))


def cfg(**changes):
    doc = {
        "base": {"name": "base", "uri": "/fake/base"},
        "sources": [{"name": "a", "uri": "/fake/a"}, {"name": "b", "uri": "/fake/b",
                                                      "params": {"weight": 0.5}}],
        "merge": {"method": "ties", "params": {"density": 0.3},
                  "overrides": [{"tensors": "layers.1?.*", "params": {"density": 0.6}},
                                {"tensors": "re:mlp", "params": {"weight": 2.0,
                                                                 "trim_scope": "tensor"}}]},
        "output": {"uri": "/out", "shard_size": "100KB"},
        "runtime": {"worker_memory": "1MB"},
    }
    doc.update(changes)
    return config_from_dict(doc)


def plan(config=None, **kw):
    return make_plan(config or cfg(), [fake_index("a"), fake_index("b")], fake_index("base"))


def test_units_are_layer_aligned_and_sized_by_bytes():
    """No unit mixes a layer with another unless whole; output and input bytes stay in budget."""
    p = plan()
    seen_layers = {}
    for unit in p.units:
        assert unit.output_bytes <= 100_000 and unit.input_bytes <= 1_000_000
        for item in unit.items:
            if item.tensor_name.startswith("layers."):
                layer = int(item.tensor_name.split(".")[1])
                seen_layers.setdefault(layer, set()).add(unit.index)
    assert all(len(units) == 1 for units in seen_layers.values())
    assert [u.shard for u in p.units][0] == f"model-00001-of-{len(p.units):05d}.safetensors"
    names = [i.tensor_name for u in p.units for i in u.items]
    assert names == sorted(names, key=natural_key)
    assert names.index("layers.2.attn.weight") < names.index("layers.10.attn.weight")


def test_params_resolution_precedence_and_stats_groups():
    """Overrides beat a model's own params, which beat merge.params; tensors with another
    global density form another statistics group; per-tensor trim needs none."""
    p = plan()
    items = {i.tensor_name: i for u in p.units for i in u.items}
    assert items["layers.3.attn.weight"].params.weight == (1.0, 0.5)
    assert items["layers.3.attn.weight"].params.density == (0.3, 0.3)
    assert items["layers.11.attn.weight"].params.density == (0.6, 0.6)
    assert items["layers.3.mlp.weight"].params.weight == (2.0, 2.0)
    assert items["layers.3.mlp.weight"].stats_group == -1
    groups = {g.params.density: g.n_tensors for g in p.stats_groups}
    assert groups == {(0.3, 0.3): 2 + 10 * 2, (0.6, 0.6): 2 * 2}
    assert items["ids"].method is None and items["ids"].inputs[0].source == 2  # from the base


def test_digest_is_stable_and_ignores_worker_count():
    """Same inputs and config: same digest, whatever the number of workers; a changed
    parameter changes it."""
    a = plan()
    b = plan(cfg(runtime={"worker_memory": "1MB", "num_workers": 7}))
    assert a.digest() == b.digest() and a.units == b.units
    c = plan(cfg(seed=3))
    assert c.digest() != a.digest()


def test_output_dtype_and_memory_estimate():
    p = plan(cfg(output={"uri": "/o", "dtype": "bfloat16", "shard_size": "1GB"}))
    items = [i for u in p.units for i in u.items]
    assert {i.out_dtype for i in items if i.method} == {"BF16"}
    assert {i.out_dtype for i in items if not i.method} == {"I64"}
    assert "estimated peak memory per worker" in describe(p)


def test_tensor_larger_than_worker_budget_is_a_plan_error():
    with pytest.raises(PlanError, match=r"tensor 'embed.weight' \[64, 64\] needs about .* "
                                        r"raise runtime.worker_memory"):
        plan(cfg(runtime={"worker_memory": "50KB"}))


def test_changed_source_pins_change_the_digest():
    """A source whose files changed (another header hash, size, revision) gives another plan
    digest, so a finished output is never mistaken for the merge of changed inputs."""
    import dataclasses

    a, b, base = fake_index("a"), fake_index("b"), fake_index("base")
    first = make_plan(cfg(), [a, b], base)
    changed = dataclasses.replace(b, pins={"model.safetensors": {"header_sha256": "x"}})
    assert make_plan(cfg(), [a, changed], base).digest() != first.digest()
    moved = dataclasses.replace(b, revision="0" * 40)
    assert make_plan(cfg(), [a, moved], base).digest() != first.digest()
