"""Hub sources from a pre-populated huggingface_hub cache (blobs/refs/snapshots), offline."""

from __future__ import annotations

import hashlib
import os
import shutil
import tracemalloc

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import save_file

from orchestrator import run_job
from orchestrator.errors import StorageError
from tests.conftest import load_state
from workers.merge.linear import LinearParams, linear

pytestmark = pytest.mark.integration


def add_to_cache(cache, repo_id, folder, commit, refs=("main",)):
    """Put ``folder`` into the cache as ``repo_id`` at ``commit``, as huggingface_hub lays it
    out: content-addressed blobs, refs naming commits, snapshots of symlinks to blobs."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    snapshot = os.path.join(repo, "snapshots", commit)
    for root, _, files in os.walk(folder):
        for name in files:
            src = os.path.join(root, name)
            rel = os.path.relpath(src, folder)
            digest = hashlib.sha256(open(src, "rb").read()).hexdigest()
            blob = os.path.join(repo, "blobs", digest)
            shutil.copyfile(src, blob)
            link = os.path.join(snapshot, rel)
            os.makedirs(os.path.dirname(link), exist_ok=True)
            os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    for ref in refs:
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)


def sha(i):
    return hashlib.sha1(str(i).encode()).hexdigest()


def test_hub_sources_pin_their_commit_and_equal_local(llama_family, tmp_path, ray_session):
    cache = str(tmp_path / "cache")
    for i, key in enumerate(("base", "ft1", "ft2")):
        add_to_cache(cache, f"org/{key}", llama_family[key], sha(i))
    add_to_cache(cache, "org/ft2", llama_family["ft3"], sha(9), refs=("v2",))
    doc = {"base": {"name": "base", "uri": "hf://org/base"},
           "sources": [{"name": "ft1", "uri": "hf://org/ft1@main"},
                       {"name": "ft2", "uri": "hf://org/ft2@v2"}],
           "merge": {"method": "ties", "params": {"density": 0.5}},
           "output": {"uri": str(tmp_path / "hub-out"), "shard_size": "12KB"},
           "hub": {"cache_dir": cache, "offline": True}}
    hub = run_job(doc)
    revisions = {s["name"]: s["revision"] for s in hub.manifest["sources"]}
    assert revisions == {"ft1": sha(1), "ft2": sha(9), "base": sha(0)}
    assert "hf://org/ft2@v2" in (tmp_path / "hub-out" / "README.md").read_text()
    card = ModelCard.load(tmp_path / "hub-out" / "README.md")  # the hub's model tree reads it
    assert card.data.base_model == ["org/base", "org/ft1", "org/ft2"]
    assert card.data.tags == ["merge", "raymerge"]

    local = {**doc, "base": {"name": "base", "uri": llama_family["base"]},
             "sources": [{"name": "ft1", "uri": llama_family["ft1"]},
                         {"name": "ft2", "uri": llama_family["ft3"]}],
             "output": {"uri": str(tmp_path / "local-out"), "shard_size": "12KB"}}
    run_job(local)
    want, got = load_state(str(tmp_path / "local-out")), load_state(str(tmp_path / "hub-out"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)

    by_sha = {**doc, "sources": [{"name": "ft1", "uri": f"hf://org/ft1@{sha(1)}"},
                                 {"name": "ft2", "uri": "hf://org/ft2@v2"}]}
    assert run_job(by_sha).skipped  # same commits: the same merge

    missing = {**doc, "sources": [{"name": "x", "uri": "hf://org/absent"}],
               "output": {"uri": str(tmp_path / "absent-out")}}
    with pytest.raises(StorageError, match="hf://org/absent: not in .* hub.offline is true"):
        run_job(missing)


def many_models(root, k):
    """k small checkpoints (six 256x192 fp32 tensors each, 1.2 MB) in one hub cache."""
    cache = str(root / "cache")
    for i in range(k):
        gen = torch.Generator().manual_seed(i)
        folder = root / f"m{i}"
        folder.mkdir()
        save_file({f"layers.{j}.weight": torch.randn(256, 192, generator=gen) for j in range(6)},
                  str(folder / "model.safetensors"), metadata={"format": "pt"})
        add_to_cache(cache, f"org/m{i}", str(folder), sha(i))
    return cache


def test_32_hub_models_in_one_job_with_flat_driver_memory(tmp_path, ray_session):
    """A linear merge of 32 cached hub models equals the reference; the driver's traced memory
    grows by far less than the added input bytes from 8 to 32 models (it never holds tensors)."""
    cache = many_models(tmp_path, 32)
    peaks = {}
    for k in (2, 8, 32):  # the first run pays one-time imports and is not compared
        doc = {"sources": [{"name": f"m{i}", "uri": f"hf://org/m{i}"} for i in range(k)],
               "merge": {"method": "linear"},
               "output": {"uri": str(tmp_path / f"out{k}"), "shard_size": "200KB"},
               "hub": {"cache_dir": cache, "offline": True}, "runtime": {"num_workers": 2}}
        tracemalloc.start()
        result = run_job(doc)
        peaks[k] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert result.plan.input_bytes > 32 * 1_000_000
    added_inputs = 24 * 6 * 256 * 192 * 4
    assert peaks[32] - peaks[8] < added_inputs / 20, peaks

    states = [load_state(str(tmp_path / f"m{i}")) for i in range(32)]
    got = load_state(str(tmp_path / "out32"))
    p = LinearParams(weight=(1.0,) * 32)
    for name in got:
        assert torch.equal(got[name], linear([s[name] for s in states], p)), name
