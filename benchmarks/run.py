"""raymerge against mergekit on the same inputs and the same YAML, side by side.

For each K (number of fine-tunes) and method, runs ``mergekit-yaml`` (from its own virtual
environment) and ``raymerge run`` (a fresh process each time: Ray start-up included)
alternately, several times, on warm inputs written by ``benchmarks/checkpoints.py``. Every run
is watched through /proc: wall time, CPU seconds and peak RSS of every process of the command
(driver, Ray's services and workers), their largest single peak and the peak of their sum. Also
measures the I/O floor on the same files: reading them once (warm, like ``cat > /dev/null``)
and loading them with ``safetensors.torch.load_file``.

    python benchmarks/run.py --mergekit ~/.cache/raymerge-tests/mergekit-0.1.5 \\
        --workdir /tmp/raymerge-bench --size 1GB --models 8 --runs 3

``--warm`` also times the job on a Ray that is already up with warm workers, as
``raymerge schedule`` runs every tick after its first
(``orchestrator.engine.executor.HeldRay``): one process holds Ray, merges once to warm its
workers, then RUNS timed merges (``warm`` runs).

``--smoke`` runs a tiny version once and checks the outputs: linear, task_arithmetic and ties
(with ``trim_ties=sort``, mergekit's exact tie-breaking) must equal mergekit's bit for bit
(with ``--warm``, the outputs checked are the warm runs').
Results go to WORKDIR/results-<size>-<dtype>-k<K>-<methods>.json (``results.json`` for the smoke
run) and a markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from checkpoints import make_inputs  # noqa: E402

from orchestrator.config.schema import parse_bytes  # noqa: E402

METHODS = {  # mergekit parameters; weights 1 and the papers' usual densities
    "linear": {"weight": 1.0},
    "task_arithmetic": {"weight": 1.0},
    "ties": {"weight": 1.0, "density": 0.2},
    "dare_ties": {"weight": 1.0, "density": 0.3},
}
GLOBAL = {"task_arithmetic": {"lambda": 0.5}}
DETERMINISTIC = ("linear", "task_arithmetic", "ties")
_TICK = os.sysconf("SC_CLK_TCK")
WARM = """
import json, shutil, sys, time
from orchestrator import run_job
from orchestrator.engine.job import resolve_config
from orchestrator.engine.executor import HeldRay
cfg, out, runs, overrides = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
walls = []
with HeldRay() as session:
    session.hold(resolve_config(cfg, overrides, out).runtime)
    for _ in range(runs + 1):  # the first run starts the workers
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        run_job(cfg, overrides, output=out)
        walls.append(time.perf_counter() - start)
print(json.dumps(walls[1:]))
"""


def mergekit_config(method: str, base: str, models: list[str], out_dtype: str) -> dict:
    doc = {"models": [{"model": m, "parameters": dict(METHODS[method])} for m in models],
           "merge_method": method, "dtype": "float32", "out_dtype": out_dtype}
    if method != "linear":
        doc["base_model"] = base
    if method in GLOBAL:
        doc["parameters"] = dict(GLOBAL[method])
    return doc


class Watch:
    """Polls a process tree: CPU seconds, per-process peak RSS (VmHWM), peak of summed RSS."""

    def __init__(self, root: int):
        self.root = root
        self.cpu: dict[int, float] = {}
        self.hwm: dict[int, int] = {}
        self.peak_sum = 0

    def poll(self) -> None:
        children: dict[int, list[int]] = {}
        stats = {}
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(entry)
            children.setdefault(int(fields[1]), []).append(pid)
            stats[pid] = (int(fields[11]) + int(fields[12])) / _TICK
        tree, todo = set(), [self.root]
        while todo:
            pid = todo.pop()
            if pid in stats:
                tree.add(pid)
            todo.extend(children.get(pid, []))
        total = 0
        for pid in tree:
            self.cpu[pid] = stats[pid]
            rss, hwm = _status_kb(pid)
            self.hwm[pid] = max(self.hwm.get(pid, 0), hwm)
            total += rss
        self.peak_sum = max(self.peak_sum, total)


def _status_kb(pid: int) -> tuple[int, int]:
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss * 1024, hwm * 1024


def measure(cmd: list[str]) -> dict:
    """Run ``cmd``, polling its process tree every 50 ms."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    watch = Watch(proc.pid)
    while proc.poll() is None:
        watch.poll()
        time.sleep(0.05)
    wall = time.perf_counter() - start
    out, err = proc.communicate()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    phases = dict(re.findall(r"(ray_start|statistics|merge) ([\d.]+)s", out))
    return {"wall": wall, "cpu": sum(watch.cpu.values()), "stdout": out,
            "max_rss": max(watch.hwm.values(), default=0), "sum_rss": watch.peak_sum,
            "processes": len(watch.hwm), "ray_start": float(phases.get("ray_start", 0)),
            "merge_phase": float(phases.get("merge", 0)) + float(phases.get("statistics", 0))}


def files_of(folders: list[str]) -> list[str]:
    return [os.path.join(d, f) for d in folders for f in sorted(os.listdir(d))
            if f.endswith(".safetensors")]


def io_floor(files: list[str]) -> dict:
    """Seconds to read every input once (warm, second read) and to load them with safetensors
    (``load_file`` maps the file; cloning every tensor makes the load a copy into memory)."""
    def read_all() -> float:
        start = time.perf_counter()
        buf = bytearray(64 << 20)
        view = memoryview(buf)
        for path in files:
            with open(path, "rb", buffering=0) as f:
                while f.readinto(view):
                    pass
        return time.perf_counter() - start

    read_all()
    cat = min(read_all() for _ in range(2))
    code = ("import sys,time,safetensors.torch as s;t=time.perf_counter()\n"  # load + copy
            "for p in sys.argv[1:]: [v.clone() for v in s.load_file(p).values()]\n"
            "print(time.perf_counter()-t)")
    load = min(float(subprocess.run([sys.executable, "-c", code, *files], check=True,
                                    capture_output=True, text=True).stdout) for _ in range(2))
    return {"read": cat, "safetensors_load": load}


def same_tensors(a: str, b: str) -> tuple[bool, float]:
    """Whether two checkpoint folders hold bit-identical tensors; the fraction of entries that
    differ."""
    from safetensors.torch import load_file

    def state(folder: str) -> dict:
        out = {}
        for path in files_of([folder]):
            out.update(load_file(path))
        return out

    x, y = state(a), state(b)
    if x.keys() != y.keys():
        return False, 1.0
    differ = total = 0
    for name in x:
        total += x[name].numel()
        if x[name].dtype != y[name].dtype or x[name].shape != y[name].shape:
            differ += x[name].numel()
        else:
            differ += int((x[name].view(-1) != y[name].view(-1)).sum())
    return differ == 0, differ / max(total, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit", required=True, help="virtual environment holding mergekit")
    ap.add_argument("--workdir", default="/tmp/raymerge-bench")
    ap.add_argument("--size", default="100MB", help="bytes per checkpoint: 100MB, 1GB, ...")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--models", default="8", help="comma-separated K values, e.g. 2,8,16")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--runs", type=int, default=3, help="runs of each tool per cell")
    ap.add_argument("--mergekit-runs", type=int, help="fewer runs for mergekit (slow methods)")
    ap.add_argument("--no-mergekit", action="store_true", help="raymerge only (memory curves)")
    ap.add_argument("--warm", action="store_true",
                    help="also time RUNS merges on a Ray already up (workers warm)")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny inputs, one run, check outputs against mergekit")
    ap.add_argument("--raymerge-arg", action="append", default=[],
                    help="extra `raymerge run` argument (repeatable), e.g. runtime.num_workers=2")
    args = ap.parse_args()
    if args.smoke:
        args.size, args.models, args.runs = "4MB", "2", 1

    ks = [int(k) for k in args.models.split(",")]
    inputs = os.path.join(args.workdir, f"{args.dtype}-{args.size}")
    base, tunes = make_inputs(inputs, parse_bytes(args.size), args.dtype, max(ks))
    mergekit_yaml = os.path.join(args.mergekit, "bin", "mergekit-yaml")
    results = {"size": args.size, "dtype": args.dtype, "runs": args.runs, "cells": []}

    for k in ks:
        files = files_of([base] + tunes[:k])
        input_bytes = sum(os.path.getsize(f) for f in files)
        floor = io_floor(files)
        print(f"K={k}: {input_bytes / 1e9:.2f} GB of inputs; warm read {floor['read']:.2f} s "
              f"({input_bytes / 1e9 / floor['read']:.2f} GB/s), safetensors load "
              f"{floor['safetensors_load']:.2f} s", flush=True)
        for method in args.methods.split(","):
            cfg = os.path.join(args.workdir, f"{method}-k{k}.yml")
            with open(cfg, "w") as f:
                yaml.safe_dump(mergekit_config(method, base, tunes[:k], args.dtype), f)
            mk_out, rm_out = (os.path.join(args.workdir, n) for n in ("out-mk", "out-rm"))
            runs: dict[str, list[dict]] = {"mergekit": [], "raymerge": []}
            mk_runs = 0 if args.no_mergekit else (args.mergekit_runs or args.runs)
            for i in range(max(args.runs, mk_runs)):
                if i < mk_runs:
                    shutil.rmtree(mk_out, ignore_errors=True)
                    runs["mergekit"].append(measure([mergekit_yaml, cfg, mk_out, "--quiet"]))
                if i < args.runs:
                    shutil.rmtree(rm_out, ignore_errors=True)
                    runs["raymerge"].append(measure(["raymerge", "run", cfg, rm_out, "--quiet",
                                                     *args.raymerge_arg]))
            if args.warm:
                shutil.rmtree(rm_out, ignore_errors=True)
                held = measure([sys.executable, "-c", WARM, cfg, rm_out, str(args.runs),
                                *args.raymerge_arg])
                runs["warm"] = [{"wall": w, "max_rss": held["max_rss"],
                                 "sum_rss": held["sum_rss"]}
                                for w in json.loads(held["stdout"].splitlines()[-1])]
            for r in (r for tool in runs.values() for r in tool):
                r.pop("stdout", None)
            cell = {"k": k, "method": method, "input_bytes": input_bytes, "io_floor": floor,
                    "output_bytes": sum(os.path.getsize(f) for f in files_of([rm_out])),
                    "runs": runs}
            if args.smoke and mk_runs:
                cell["equal"], cell["differing"] = same_tensors(mk_out, rm_out)
                if method == "ties":  # the default keeps ties at the threshold: check sort too
                    shutil.rmtree(rm_out, ignore_errors=True)
                    measure(["raymerge", "run", cfg, rm_out, "--quiet",
                             "merge.params.trim_ties=sort"])
                    cell["equal_sort"], _ = same_tensors(mk_out, rm_out)
            results["cells"].append(cell)
            print(row(cell), flush=True)
    name = f"results-{args.size}-{args.dtype}-k{args.models}-{args.methods}.json".replace(",", "_")
    with open(os.path.join(args.workdir, "results.json" if args.smoke else name), "w") as f:
        json.dump(results, f, indent=1)
    if args.smoke:
        bad = [c["method"] for c in results["cells"] if c["method"] in DETERMINISTIC
               and not c.get("equal_sort", c.get("equal"))]
        if bad:
            sys.exit(f"outputs differ from mergekit's for {', '.join(bad)}")
        print("smoke: outputs equal mergekit's for " + ", ".join(DETERMINISTIC))


def median(runs: list[dict], key: str) -> float:
    return statistics.median(r.get(key, float("nan")) for r in runs) if runs else float("nan")


def row(cell: dict) -> str:
    """| K | method | mergekit s | raymerge s | minus Ray start | merge phase | speed-up |
    speed-up minus start | raymerge GB/s | CPU s mk/rm | max RSS GiB mk/rm | sum RSS GiB rm |"""
    mk, rm = cell["runs"]["mergekit"], cell["runs"]["raymerge"]
    mk_wall, rm_wall = median(mk, "wall"), median(rm, "wall")
    rm_ns = statistics.median(r["wall"] - r["ray_start"] for r in rm)
    gb = cell["input_bytes"] / 1e9
    return (f"| {cell['k']} | {cell['method']} | {mk_wall:.1f} | {rm_wall:.1f} | {rm_ns:.1f} | "
            f"{median(rm, 'merge_phase'):.1f} | "
            f"{mk_wall / rm_wall:.1f}x | {mk_wall / rm_ns:.1f}x | {gb / rm_wall:.2f} | "
            f"{median(mk, 'cpu'):.0f} / {median(rm, 'cpu'):.0f} | "
            f"{median(mk, 'max_rss') / 2**30:.2f} / {median(rm, 'max_rss') / 2**30:.2f} | "
            f"{median(rm, 'sum_rss') / 2**30:.2f} |"
            + (f" equal: {cell['equal']} ({cell['differing']:.2%} differ)"
               if "equal" in cell else "")
            + (warm(cell) if "warm" in cell["runs"] else ""))


def warm(cell: dict) -> str:
    """The warm runs: median wall, its ratio to mergekit and to the load + copy floor."""
    mk, held = median(cell["runs"]["mergekit"], "wall"), median(cell["runs"]["warm"], "wall")
    return (f" warm (Ray up): {held:.2f} s, {mk / held:.1f}x mergekit, "
            f"{held / cell['io_floor']['safetensors_load']:.1f}x the load + copy floor, max RSS "
            f"{median(cell['runs']['warm'], 'max_rss') / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
