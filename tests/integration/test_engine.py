"""End to end on a local Ray: tiny sharded Llama checkpoints, every method, 1 and 2 workers,
the in-process executor and a naive reference built with the safetensors library."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml
from safetensors import safe_open

from orchestrator.cli import main
from orchestrator.planning.layout import layer_counts, layer_of
from orchestrator.planning.plan import natural_key
from tests.conftest import load_state, tiny_llama
from tests.unit.merge.helpers import params
from workers.merge import METHODS
from workers.merge.dare_linear import keep_mask
from workers.merge.registry import internal_fields, per_model_fields
from workers.tasks import keyed_generator

pytestmark = pytest.mark.integration

CASES = {
    "linear": ({"weight": 0.5}, {"ft2": {"weight": 1.5}}),
    "task_arithmetic": ({"scale": 0.4}, {"ft1": {"weight": 0.7}}),
    "ties": ({"density": 0.3}, {"ft3": {"density": 0.5}}),
    "ties_tensor": ({"density": 0.3, "trim_scope": "tensor", "normalize": False}, {}),
    "dare_linear": ({"density": 0.6}, {}),
    "dare_ties": ({"density": 0.4, "rescale": "l1"}, {}),
    "breadcrumbs": ({"density": 0.8, "gamma": 0.05}, {}),
    "slerp": ({"t": 0.3}, {}),
    "model_stock": ({}, {}),
    "della": ({"density": 0.6, "epsilon": 0.2}, {"ft2": {"density": 0.8}}),
    "della_linear": ({"density": 0.5, "rescale": "l1"}, {}),
    "sce": ({"select_topk": 0.5}, {}),
    "nuslerp": ({}, {"ft1": {"weight": 0.3}}),
    "nuslerp_base": ({"flatten": False}, {}),
    "multislerp": ({}, {"ft3": {"weight": 2.0}}),
    "multislerp_base": ({"normalize": False}, {"ft1": {"weight": 0.5}}),
    "karcher": ({"max_iter": 4}, {}),
    "nearswap": ({"t": 0.002}, {}),
    "arcee_fusion": ({}, {}),
    "passthrough": ({}, {"ft1": {"scale": 0.5}}),
    "breadcrumbs_ties": ({"density": 0.7, "gamma": 0.05, "normalize": True}, {}),
    "ram": ({"epsilon": 0.002}, {}),
    "ramplus_tl": ({"epsilon": 0.002, "r": 0.5}, {}),
    "lines": ({"alpha": 0.2, "beta": 0.6}, {"ft2": {"weight": 0.5}}),
    "consensus": ({"scale": 0.7}, {"ft1": {"mask_lambda": 0.3}}),
    "pcb": ({"ratio": 0.3, "scale": 0.9}, {}),
}


def method_of(case):
    """The method a case runs: ``ties_tensor`` is ties; ``<method>_base`` gives an optional
    base."""
    return {"ties_tensor": "ties"}.get(case, case.removesuffix("_base"))


def write_job(tmp_path, family, case, out, **runtime):
    method = method_of(case)
    global_params, per_model = CASES[case]
    names = ["ft1", "ft2", "ft3"][:METHODS[method].max_models or 3]
    doc = {
        "sources": [{"name": n, "uri": family[n], "params": per_model.get(n, {})} for n in names],
        "merge": {"method": method, "params": global_params},
        "output": {"uri": str(out), "shard_size": "12KB"},
        "seed": 5,
        "runtime": runtime,
    }
    if METHODS[method].needs_base or case.endswith("_base"):
        doc["base"] = {"name": "base", "uri": family["base"]}
    path = tmp_path / f"{case}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path), doc


def reference(doc, family):
    """The merge computed tensor by tensor from whole state dicts loaded by safetensors."""
    spec = METHODS[doc["merge"]["method"]]
    names = [s["name"] for s in doc["sources"]]
    states = [load_state(s["uri"]) for s in doc["sources"]]
    base = load_state(doc["base"]["uri"]) if "base" in doc else None
    values = dict(doc["merge"]["params"])
    for f, default in per_model_fields(spec.params).items():
        default = values.get(f, default)
        values[f] = [s["params"].get(f, default) for s in doc["sources"]]
    p = params(spec.params, len(names), **values)
    if spec.name == "pcb":  # global order statistics: the whole model as one flat tensor
        order = sorted(base, key=natural_key)
        flat = [torch.cat([s[n].reshape(-1) for n in order]) for s in states]
        merged = spec.fn(flat, p, base=torch.cat([base[n].reshape(-1) for n in order]))
        pieces = merged.split([base[n].numel() for n in order])
        return {n: piece.reshape(base[n].shape) for n, piece in zip(order, pieces)}
    stats = {}
    if spec.name == "ties" and p.trim_scope == "global":
        # exactly k entries per model: largest |τ| first, ties in plan (tensor, index) order
        order = sorted(base, key=natural_key)
        for i in range(len(names)):
            taus = [(states[i][n] - base[n]).abs().reshape(-1) for n in order]
            flat = torch.cat(taus)
            k = int(p.density[i] * flat.numel())
            ranked = torch.sort(flat, descending=True, stable=True)
            threshold = float(ranked.values[k - 1])
            kept = torch.zeros(flat.numel(), dtype=torch.bool)
            kept[ranked.indices[:k]] = True
            for n, piece in zip(order, kept.split([t.numel() for t in taus])):
                tied = int((piece & (flat.split([t.numel() for t in taus])[order.index(n)]
                                     == threshold)).sum())
                stats.setdefault(n, []).append([threshold, tied])
    counts = layer_counts(list(states[0]))
    out = {}
    for name in states[0]:
        if "position" in internal_fields(spec.params):  # depth in the stack, 0 outside it
            hit = layer_of(name)
            depth = hit[1] / (counts[hit[0]] - 1) if hit else 0.0
            p = dataclasses.replace(p, position=depth)
        kw = {}
        if spec.uses_base:
            kw["base"] = base[name] if base is not None else None
        if spec.uses_rng:
            kw["rng"] = [keyed_generator(doc["seed"], n, name) for n in names]
        if spec.stats is not None:
            kw["stats"] = stats.get(name)
        out[name] = spec.fn([s[name] for s in states], p, **kw)
    return out


def shard_digests(out):
    manifest = json.loads((out / "raymerge-manifest.json").read_text())
    return {s["file"]: s["sha256"] for s in manifest["shards"]}


@pytest.mark.parametrize("case", list(CASES))
def test_ray_workers_local_and_reference_agree(case, llama_family, ray_session, tmp_path):
    """1 worker, 2 workers and the in-process executor write bit-identical shards, equal to the
    naive reference; the output is a sharded HF checkpoint that safe_open reads."""
    outs = {}
    for label, runtime in (("w1", {"num_workers": 1}), ("w2", {"num_workers": 2}),
                           ("local", {"executor": "local"})):
        outs[label] = tmp_path / label
        cfg, doc = write_job(tmp_path, llama_family, case, outs[label], **runtime)
        assert main(["run", cfg, "--quiet"]) == 0
    digests = [shard_digests(o) for o in outs.values()]
    assert len(digests[0]) > 1 and digests[0] == digests[1] == digests[2]

    want = reference(doc, llama_family)
    got = load_state(str(outs["w2"]))
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor.to(got[name].dtype)), name
    index = json.loads((outs["w2"] / "model.safetensors.index.json").read_text())
    for name, shard in index["weight_map"].items():
        with safe_open(str(outs["w2"] / shard), "pt") as f:
            assert name in f.keys()


def test_output_loads_with_transformers_and_verifies(llama_family, ray_session, tmp_path,
                                                     capsys):
    """The merged folder loads as LlamaForCausalLM and runs; verify passes; a re-run is a
    no-op; a flipped byte fails verify naming the file."""
    from transformers import LlamaForCausalLM

    out = tmp_path / "out"
    cfg, _ = write_job(tmp_path, llama_family, "ties", out)
    assert main(["run", cfg, "--quiet"]) == 0
    model = LlamaForCausalLM.from_pretrained(str(out)).eval()
    logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 64) and torch.isfinite(logits).all()
    card = (out / "README.md").read_text()
    assert "ties" in card and "ft3" in card and "density: 0.3" in card

    assert main(["verify", str(out)]) == 0
    assert main(["run", cfg]) == 0
    assert "nothing to do" in capsys.readouterr().out

    shard = sorted(out.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 1
    assert f"{shard.name}: sha256" in capsys.readouterr().err


def test_changed_config_needs_force_and_then_replaces(llama_family, ray_session, tmp_path,
                                                      capsys):
    out = tmp_path / "out"
    cfg, _ = write_job(tmp_path, llama_family, "task_arithmetic", out)
    assert main(["run", cfg, "--quiet"]) == 0
    assert main(["run", cfg, "merge.params.scale=0.9", "--quiet"]) == 1
    assert "was made by another job than this one" in capsys.readouterr().err
    assert main(["run", cfg, "merge.params.scale=0.9", "--force", "--quiet"]) == 0
    manifest = json.loads((out / "raymerge-manifest.json").read_text())
    assert manifest["config"]["merge"]["params"]["scale"] == 0.9


def test_bf16_task_vectors_are_formed_in_fp32(tmp_path, ray_session):
    """bf16 checkpoints: task arithmetic with K = 1, λ = 1 returns the fine-tune bit for bit
    (deltas in fp32, not in bf16), and the output keeps bf16."""
    base = tiny_llama(str(tmp_path / "base"), dtype=torch.bfloat16)
    ft = tiny_llama(str(tmp_path / "ft"), seed=1, base=base, scale=0.001, dtype=torch.bfloat16)
    doc = {"base": {"name": "base", "uri": base}, "sources": [{"name": "ft", "uri": ft}],
           "merge": {"method": "task_arithmetic"}, "output": {"uri": str(tmp_path / "out")}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
    assert main(["run", str(tmp_path / "job.yaml"), "--quiet"]) == 0
    got, want = load_state(str(tmp_path / "out")), load_state(ft)
    for name in want:
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], want[name]), name


def test_plan_command_prints_units_without_merging(llama_family, tmp_path, capsys):
    cfg, _ = write_job(tmp_path, llama_family, "ties", tmp_path / "never")
    assert main(["plan", cfg]) == 0
    text = capsys.readouterr().out
    assert "global statistics pass (ties)" in text and "model-00001-of-" in text
    assert "estimated peak memory per worker" in text
    assert not (tmp_path / "never").exists()


def chunked_reference(doc, family, chunk):
    """The reference with rng methods applied chunk by chunk, as workers key their masks:
    chunk c of a tensor draws from keyed_generator(seed, model, tensor, c); DARE's L1 factors
    are summed over the whole tensor."""
    spec = METHODS[doc["merge"]["method"]]
    if not spec.uses_rng:
        return reference(doc, family)
    names = [s["name"] for s in doc["sources"]]
    states = [load_state(s["uri"]) for s in doc["sources"]]
    base = load_state(doc["base"]["uri"])
    p = params(spec.params, len(names), **doc["merge"]["params"])
    out = {}
    for name in base:
        flat = [s[name].reshape(-1) for s in states]
        b = base[name].reshape(-1)
        starts = range(0, b.numel(), chunk)
        gens = [[keyed_generator(doc["seed"], n, name, c // chunk) for n in names]
                for c in starts]
        factors = None
        if p.rescale == "l1":
            sums = torch.zeros(len(names), 2, dtype=torch.float64)
            for c, g in zip(starts, gens):
                for i, x in enumerate(flat):
                    tau = x[c:c + chunk] - b[c:c + chunk]
                    keep = keep_mask(tau.shape, p.density[i], g[i], tau.dtype)
                    sums[i] += torch.stack([tau.abs().sum(dtype=torch.float64),
                                            (tau * keep).abs().sum(dtype=torch.float64)])
            factors = [a / k if min(a, k) >= 1e-7 else 1.0 for a, k in sums.tolist()]
            gens = [[keyed_generator(doc["seed"], n, name, c // chunk) for n in names]
                    for c in starts]
        pieces = [spec.fn([x[c:c + chunk] for x in flat], p, base=b[c:c + chunk], rng=g,
                          tensor_stats=factors) for c, g in zip(starts, gens)]
        out[name] = torch.cat(pieces).reshape(base[name].shape)
    return out


@pytest.mark.parametrize("case", ["linear", "ties", "dare_ties", "slerp"])
def test_mapped_and_read_inputs_give_the_same_bytes(case, llama_family, tmp_path, monkeypatch):
    """Local inputs are mapped (read where they lie in the page cache); read into the buffer
    instead, as object storage is, they give the same shards."""
    from workers.io.storage import LocalStore

    digests = {}
    for how in ("mapped", "read"):
        if how == "read":
            monkeypatch.delattr(LocalStore, "map_range")
        cfg, _ = write_job(tmp_path, llama_family, case, tmp_path / how, executor="local")
        assert main(["run", cfg, "--quiet"]) == 0
        manifest = json.loads((tmp_path / how / "raymerge-manifest.json").read_text())
        digests[how] = {s["file"]: s["sha256"] for s in manifest["shards"]}
    assert digests["mapped"] == digests["read"]


def chunked_cases():
    """Elementwise cases; those with per-tensor statistics passes also with their tensors
    read again each pass (nothing fits HOLD_BYTES) and held as read into the buffer, as from
    object storage, where HOLD_BYTES (4096) is a tensor's size but not a whole number of the
    48-element chunks (the q and o projections: 256 entries x 4 float32 inputs)."""
    for c in CASES:
        spec = METHODS[method_of(c)]
        p = params(spec.params, 1, **CASES[c][0])
        if spec.is_elementwise(p):
            yield pytest.param(c, "held", id=c)
            if spec.tensor_stats_for(p) is not None:
                yield pytest.param(c, "reread", id=f"{c}-reread")
                yield pytest.param(c, "held-read", id=f"{c}-held-read")


@pytest.mark.parametrize("case, variant", chunked_cases())
def test_chunked_tensors_equal_whole_tensor_reference(case, variant, llama_family, tmp_path,
                                                      monkeypatch):
    """Elementwise methods run on chunks of a tensor, read a window of chunks at a time: with
    chunks of 64 elements (most tensors span many chunks and windows) the result equals the
    whole-tensor reference, and DARE's masks follow their (tensor, chunk) keys."""
    import workers.tasks
    from workers.io.storage import LocalStore

    chunk = 48 if variant == "held-read" else 64
    monkeypatch.setattr(workers.tasks, "CHUNK", chunk)
    monkeypatch.setattr(workers.tasks, "READ_WINDOW", chunk * 4 * 3 * 4)
    if variant == "reread":
        monkeypatch.setattr(workers.tasks, "HOLD_BYTES", 0)
    if variant == "held-read":
        monkeypatch.setattr(workers.tasks, "HOLD_BYTES", 4096)
        monkeypatch.delattr(LocalStore, "map_range")
    out = tmp_path / "out"
    cfg, doc = write_job(tmp_path, llama_family, case, out, executor="local")
    assert main(["run", cfg, "--quiet"]) == 0
    got, want = load_state(str(out)), chunked_reference(doc, llama_family, chunk)
    for name, tensor in want.items():
        if doc["merge"]["params"].get("rescale") == "l1":  # float64 sums in another order
            torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(got[name], tensor.to(got[name].dtype)), name
