"""Weight matching's two schedules side by side: the sequential coordinate descent on the
driver and the colored (Jacobi-style) schedule whose classes of groups step at once on Ray
workers.

Two Llama-style decoders (transformers' ``LlamaForCausalLM``, random inits with different
seeds, float32) are written once; then ``raymerge run`` merges them with ``weight_matching``
under each schedule, alternately, ``--repeats`` times each, on a fresh embedded Ray with
``--workers`` workers. Reported: median wall time of the whole run (Ray start included), the
number of sweeps and the final objective (from the run's progress line).

    python benchmarks/align_speed.py --hidden 512 --layers 8 --workers 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time


def write_models(root: str, hidden: int, layers: int) -> list[str]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        config = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                             num_hidden_layers=layers, num_attention_heads=hidden // 64,
                             num_key_value_heads=hidden // 64, vocab_size=2048,
                             tie_word_embeddings=False)
        folder = os.path.join(root, f"model-{seed}")
        LlamaForCausalLM(config).save_pretrained(folder)
        folders.append(folder)
    return folders


def run(root: str, models: list[str], schedule: str, workers: int, label: str) -> dict:
    import yaml

    out = os.path.join(root, f"out-{label}")
    job = {"sources": [{"name": f"m{i}", "uri": m} for i, m in enumerate(models)],
           "merge": {"method": "weight_matching", "params": {"schedule": schedule}},
           "output": {"uri": out}, "runtime": {"num_workers": workers}}
    path = os.path.join(root, f"{label}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(job, f)
    start = time.perf_counter()
    done = subprocess.run(["raymerge", "run", path, "--force"], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"raymerge failed:\n{done.stderr[-2000:]}")
    found = re.search(r"weight matching m1: (\d+) sweeps, objective (\S+)", done.stderr)
    return {"wall_s": wall, "sweeps": int(found[1]), "objective": float(found[2])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", help="write the runs as JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        models = write_models(root, args.hidden, args.layers)
        runs: dict[str, list[dict]] = {"sequential": [], "colors": []}
        for i in range(args.repeats):
            for schedule in runs:
                runs[schedule].append(run(root, models, schedule, args.workers,
                                          f"{schedule}-{i}"))
    seq = statistics.median(r["wall_s"] for r in runs["sequential"])
    print("| schedule | median wall (s) | sweeps | objective |")
    print("| --- | --- | --- | --- |")
    for schedule, rows in runs.items():
        wall = statistics.median(r["wall_s"] for r in rows)
        print(f"| {schedule} | {wall:.1f} ({seq / wall:.2f}x) | {rows[0]['sweeps']} | "
              f"{rows[0]['objective']:.6g} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
