"""Task-aware merges (tall, emr) end to end: 1 and 2 Ray workers and the in-process executor
write the same unified model and packed masks; each task's model rebuilt by the loader matches
a naive reference; one task comes back; a tampered mask folder is refused."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

from orchestrator.cli import main
from orchestrator.errors import ConfigError, MergeError
from orchestrator.phases.task_aware import task_state
from tests.conftest import load_state

pytestmark = pytest.mark.integration

NAMES = ("ft1", "ft2", "ft3")


def write_job(tmp_path, family, method, out, names=NAMES, params=None, **runtime):
    doc = {"base": {"name": "base", "uri": family["base"]},
           "sources": [{"name": n, "uri": family[n]} for n in names],
           "merge": {"method": method, "params": params or {}},
           "output": {"uri": str(out), "shard_size": "12KB"}, "runtime": runtime}
    path = tmp_path / f"{method}-{out.name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def digests(folder):
    manifest = json.loads((folder / "raymerge-manifest.json").read_text())
    return {s["file"]: s["sha256"] for s in manifest["shards"] + manifest["files"]
            if s["file"].endswith(".safetensors")}


def naive_task(family, method, t, lambdas=(0.6, 0.6, 0.6)):
    """Task t's model from whole state dicts, entry by entry rules written out again."""
    base = load_state(family["base"])
    states = [load_state(family[n]) for n in NAMES]
    taus = {k: torch.stack([s[k] - base[k] for s in states]) for k in base}
    if method == "tall":
        out = {}
        for k, tau in taus.items():
            total = tau.sum(0)
            mask = tau[t].abs() > lambdas[t] * (total - tau[t]).abs()
            out[k] = base[k] + mask * total
        return out
    gammas = {k: torch.where(tau.sum(0) > 0, 1.0, -1.0) for k, tau in taus.items()}
    unis = {k: (tau.abs() * (tau * gammas[k] > 0)).amax(0) * gammas[k]
            for k, tau in taus.items()}
    own = sum(float(tau[t].double().abs().sum()) for tau in taus.values())
    kept = sum(float(((tau[t] * gammas[k] > 0) * unis[k]).double().abs().sum())
               for k, tau in taus.items())
    return {k: base[k] + (own / kept) * (tau[t] * gammas[k] > 0) * unis[k]
            for k, tau in taus.items()}


@pytest.mark.parametrize("method", ["tall", "emr"])
def test_workers_agree_and_tasks_match_the_reference(method, llama_family, ray_session,
                                                     tmp_path):
    outs = {}
    for label, runtime in (("w1", {"num_workers": 1}), ("w2", {"num_workers": 2}),
                           ("local", {"executor": "local"})):
        outs[label] = tmp_path / label
        assert main(["run", write_job(tmp_path, llama_family, method, outs[label],
                                      **runtime), "--quiet"]) == 0
    main_digests = [digests(o) for o in outs.values()]
    mask_digests = [digests(o / "masks") for o in outs.values()]
    assert main_digests[0] == main_digests[1] == main_digests[2]
    assert mask_digests[0] == mask_digests[1] == mask_digests[2]
    manifest = json.loads((outs["w2"] / "raymerge-manifest.json").read_text())
    assert "masks/raymerge-manifest.json" in {f["file"] for f in manifest["files"]}
    masks = load_state(str(outs["w2"] / "masks"))
    base = load_state(llama_family["base"])
    assert set(masks) == set(base)  # one packed mask per float tensor
    for k, packed in masks.items():
        assert packed.dtype == torch.uint8 and packed.shape == (-(-base[k].numel() // 8), 3)
    if method == "emr":
        assert len(manifest["method_state"]["rescalers"]) == 3
    for t, name in enumerate(NAMES):
        got = task_state(str(outs["w2"]), name)
        want = naive_task(llama_family, method, t)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)


def test_one_task_comes_back_and_cli_writes_a_loadable_model(llama_family, ray_session,
                                                             tmp_path):
    from transformers import LlamaForCausalLM

    out = tmp_path / "one"
    assert main(["run", write_job(tmp_path, llama_family, "emr", out, names=("ft2",),
                                  executor="local"), "--quiet"]) == 0
    dest = tmp_path / "ft2-model"
    assert main(["task-model", str(out), "ft2", str(dest)]) == 0
    want = load_state(llama_family["ft2"])
    got = load_state(str(dest))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    model = LlamaForCausalLM.from_pretrained(str(dest)).eval()
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    # the task's model is never written over a source of the merge, nor into the merge
    for into in (llama_family["base"], out / "sub"):
        assert main(["task-model", str(out), "ft2", str(into)]) == 2
    assert load_state(llama_family["ft2"]).keys() == want.keys()
    assert not os.path.exists(os.path.join(llama_family["base"], "model.safetensors"))


def test_unknown_task_and_tampered_masks_are_refused(llama_family, ray_session, tmp_path):
    out = tmp_path / "tall"
    assert main(["run", write_job(tmp_path, llama_family, "tall", out, executor="local"),
                 "--quiet"]) == 0
    with pytest.raises(ConfigError, match="no task 'ft9'; tasks: ft1, ft2, ft3"):
        task_state(str(out), "ft9")
    manifest = out / "masks" / "raymerge-manifest.json"
    manifest.write_text(manifest.read_text().replace('"tall"', '"tall" '))
    with pytest.raises(MergeError, match="is not the one the output's manifest lists"):
        task_state(str(out), "ft1")
    plain = tmp_path / "ta"
    assert main(["run", write_job(tmp_path, llama_family, "task_arithmetic", plain,
                                  executor="local"), "--quiet"]) == 0
    with pytest.raises(ConfigError, match="has no per-task models"):
        task_state(str(plain), "ft1")
