"""Side-by-side wall time of raymerge and mergekit on the same inputs, alternating runs.

Inputs: a Llama-style checkpoint (config.json + sharded safetensors + index, written by
transformers from a seeded random init, about 140 MB in fp32) and K fine-tunes of it (base plus
seeded deltas), generated once under WORKDIR/inputs (warm page cache after the first run).
For each method the same mergekit YAML is run by ``mergekit-yaml`` (from the given virtual
environment) and by ``raymerge run`` (a fresh process each time, so Ray start-up is included).
"minus Ray start-up" subtracts the ``ray_start`` phase that ``raymerge run`` prints (ray.init
of the embedded cluster); the in-process column runs the same task bodies without Ray.

    python benchmarks/compare_mergekit.py --mergekit ~/.cache/raymerge-tests/mergekit-0.1.5 \
        --workdir /tmp/raymerge-bench --models 3 --runs 3
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import yaml

METHODS = {
    "linear": {"parameters": {"weight": 1.0}},
    "task_arithmetic": {"parameters": {"weight": 1.0, "lambda": 0.5}},
    "ties": {"parameters": {"weight": 1.0, "density": 0.2}},
    "dare_ties": {"parameters": {"weight": 1.0, "density": 0.3}},
}


def mergekit_config(method: str, base: str, models: list[str]) -> dict:
    params = dict(METHODS[method]["parameters"])
    per_model = {k: params.pop(k) for k in ("weight", "density") if k in params}
    doc = {"models": [{"model": m, "parameters": per_model} for m in models],
           "merge_method": method, "dtype": "float32"}
    if method != "linear":
        doc["base_model"] = base
    if params:
        doc["parameters"] = params
    return doc


def make_inputs(base: str, models: list[str]) -> None:
    """A Llama-style base (hidden 512, 8 layers, vocab 8000) and fine-tunes = base + deltas."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if all(os.path.exists(os.path.join(m, "config.json")) for m in [base] + models):
        return
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8000, hidden_size=512, intermediate_size=1408,
                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    model.save_pretrained(base, max_shard_size="50MB")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for i, folder in enumerate(models):
        gen = torch.Generator().manual_seed(i + 1)
        model.load_state_dict({k: v + 0.01 * v.std() * torch.randn(v.shape, generator=gen)
                               for k, v in state.items()})
        model.save_pretrained(folder, max_shard_size="50MB")


def timed(cmd: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit", required=True, help="virtual environment with mergekit")
    ap.add_argument("--workdir", default="/tmp/raymerge-bench")
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()

    inputs = os.path.join(args.workdir, "inputs")
    base = os.path.join(inputs, "base")
    models = [os.path.join(inputs, f"finetune-{i + 1}") for i in range(args.models)]
    make_inputs(base, models)
    input_bytes = sum(os.path.getsize(os.path.join(m, f)) for m in models + [base]
                      for f in os.listdir(m) if f.endswith(".safetensors"))

    rows = []
    for method in args.methods.split(","):
        cfg = os.path.join(args.workdir, f"{method}.yml")
        with open(cfg, "w") as f:
            yaml.safe_dump(mergekit_config(method, base, models), f)
        times: dict[str, list[float]] = {"mk": [], "rm": [], "rm_no_start": [], "local": []}
        for _ in range(args.runs):
            times["mk"].append(timed([os.path.join(args.mergekit, "bin", "mergekit-yaml"), cfg,
                                      fresh(args.workdir, "out-mk"), "--quiet"])[0])
            wall, stdout = timed(["raymerge", "run", cfg, fresh(args.workdir, "out-rm"),
                                  "--quiet", "output.shard_size=50MB"])
            times["rm"].append(wall)
            times["rm_no_start"].append(wall - float(re.search(r"ray_start ([\d.]+)s",
                                                               stdout)[1]))
            times["local"].append(timed(["raymerge", "run", cfg, fresh(args.workdir, "out-rm"),
                                         "--quiet", "output.shard_size=50MB",
                                         "runtime.executor=local"])[0])
        rows.append((method, *(statistics.median(times[k]) for k in times)))

    print(f"inputs: base + {args.models} models, {input_bytes / 1e6:.0f} MB fp32; "
          f"median of {args.runs} alternating runs; wall times of whole commands, seconds")
    print("| method | mergekit | raymerge, Ray (2 workers) | same, minus Ray start-up | "
          "raymerge, in-process executor | mergekit / raymerge Ray | "
          "mergekit / raymerge Ray minus start-up |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for method, mk, rm, rm_ns, local in rows:
        print(f"| {method} | {mk:.2f} | {rm:.2f} | {rm_ns:.2f} | {local:.2f} | {mk / rm:.2f} | "
              f"{mk / rm_ns:.2f} |")


def fresh(workdir: str, name: str) -> str:
    out = os.path.join(workdir, name)
    shutil.rmtree(out, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
