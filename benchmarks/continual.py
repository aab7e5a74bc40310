"""Continual merging on a tiny multi-task benchmark: OPCM vs continual averaging vs task
arithmetic over all models at once (METHODS.md section 7, Suite B).

A base MLP (64 -> 128 -> 128 -> 128 -> 10, ReLU) is trained on sklearn's digits; six fine-tunes
each learn a transformed copy with a fresh 10-way head: ``--domains mild`` (noise, low contrast,
1-px shift, gamma, blur, erase) or ``hard`` (rot90, rot180, invert, transpose, hflip, 2-px
shift). Only the bodies are merged, by raymerge itself (in-process executor, real safetensors
checkpoints); each task keeps its head (task-aware accuracy on the task's test images,
averaged). Models arrive in 3 random orders per seed:

* OPCM: one continual step per arriving model (``raymerge run`` of an opcm job = the steps);
* continual averaging: the running mean, one continual ``linear`` step per arriving model
  (what ``raymerge schedule`` does for a uniform soup);
* task arithmetic over all six at once, λ chosen on a validation split (not continual).

    python benchmarks/continual.py --domains mild --alpha 0.5 --out results.json

``--smoke`` trains for a few epochs and runs one seed and one order (CI: it runs, the numbers
are not meant to rank anything).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from orchestrator import run_job  # noqa: E402

DOMAINS = {"mild": ("noise", "contrast", "shift", "gamma", "blur", "erase"),
           "hard": ("rot90", "rot180", "invert", "transpose", "hflip", "shift2")}
LAMBDAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0)


def transform(task: str, x: np.ndarray, seed: int) -> np.ndarray:
    """A domain shift of 8x8 images in [0, 1] (rows of 64)."""
    rng = np.random.default_rng(seed)
    img = x.reshape(-1, 8, 8)
    if task == "noise":
        out = img + rng.normal(0, 0.15, img.shape)
    elif task == "contrast":
        out = 0.5 + 0.4 * (img - 0.5)
    elif task == "shift":
        out = np.zeros_like(img)
        out[:, :, 1:] = img[:, :, :-1]
    elif task == "gamma":
        out = img ** 2.5
    elif task in ("rot90", "rot180"):
        out = np.rot90(img, 1 if task == "rot90" else 2, axes=(1, 2))
    elif task == "invert":
        out = 1 - img
    elif task == "transpose":
        out = img.transpose(0, 2, 1)
    elif task == "hflip":
        out = img[:, :, ::-1]
    elif task == "shift2":
        out = np.zeros_like(img)
        out[:, 2:, 2:] = img[:, :-2, :-2]
    elif task == "blur":
        padded = np.pad(img, ((0, 0), (1, 1), (1, 1)), mode="edge")
        out = sum(padded[:, i:i + 8, j:j + 8] for i in range(3) for j in range(3)) / 9
    else:  # erase a random 3x3 patch of each image
        out = img.copy()
        for n, (r, c) in enumerate(rng.integers(0, 6, size=(len(img), 2))):
            out[n, r:r + 3, c:c + 3] = 0
    return np.clip(out, 0, 1).reshape(-1, 64).astype(np.float32)


def body() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                         nn.Linear(128, 128), nn.ReLU())


def train(net: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    xs, ys = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        for idx in torch.randperm(len(xs)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(xs[idx]), ys[idx]).backward()
            opt.step()


def accuracy(trunk: nn.Module, head: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((head(trunk(torch.from_numpy(x))).argmax(1).numpy() == y).mean())


def save_body(net: nn.Module, folder: str) -> str:
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in net.state_dict().items()},
              os.path.join(folder, "model.safetensors"))
    return folder


def merged_body(folder: str) -> nn.Module:
    state = {}
    for name in os.listdir(folder):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(folder, name)))
    net = body()
    net.load_state_dict(state)
    return net.eval()


def merge(method: str, base: str, models: list[tuple[str, str]], out: str, **params) -> str:
    job = {"base": {"name": "base", "uri": base},
           "sources": [{"name": n, "uri": u} for n, u in models],
           "merge": {"method": method, "params": params},
           "output": {"uri": out}, "runtime": {"executor": "local"}}
    return run_job(job, force=True).output


def running_mean(models: list[tuple[str, str]], work: str) -> str:
    """Continual averaging as the scheduler runs it: step t = linear of (previous, new) with
    weights (t − 1, 1)."""
    previous = models[0][1]
    for t, (name, uri) in enumerate(models[1:], start=2):
        job = {"sources": [{"name": "previous", "uri": previous,
                            "params": {"weight": float(t - 1)}},
                           {"name": name, "uri": uri, "params": {"weight": 1.0}}],
               "merge": {"method": "linear"}, "output": {"uri": f"{work}/mean-{t}"},
               "runtime": {"executor": "local"}}
        previous = run_job(job, force=True).output
    return previous


def one_seed(seed: int, orders: int, epochs: tuple[int, int], work: str, alpha: float,
             domains: str) -> dict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = (digits.data / 16).astype(np.float32), digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, stratify=y,
                                                        random_state=seed)
    x_fit, x_val, y_fit, y_val = train_test_split(x_train, y_train, test_size=0.2,
                                                  stratify=y_train, random_state=seed)
    torch.manual_seed(seed)
    trunk, head = body(), nn.Linear(128, 10)
    train(nn.Sequential(trunk, head), x_fit, y_fit, epochs[0], seed)
    base = save_body(trunk, f"{work}/base")
    tasks = {}
    for i, task in enumerate(DOMAINS[domains]):
        torch.manual_seed(seed * 100 + i)
        ft = body()
        ft.load_state_dict(trunk.state_dict())
        task_head = nn.Linear(128, 10)
        fit, val, test = (transform(task, a, seed * 10 + i + k)
                          for k, a in enumerate((x_fit, x_val, x_test)))
        train(nn.Sequential(ft, task_head), fit, y_fit, epochs[1], seed * 100 + i)
        tasks[task] = {"head": task_head.eval(), "uri": save_body(ft, f"{work}/{task}"),
                       "val": (val, y_val), "test": (test, y_test),
                       "individual": accuracy(ft.eval(), task_head, test, y_test)}

    def score(folder: str, split: str) -> float:
        net = merged_body(folder)
        return statistics.mean(accuracy(net, t["head"], *t[split]) for t in tasks.values())

    models = [(task, t["uri"]) for task, t in tasks.items()]
    row = {"seed": seed, "individual": statistics.mean(t["individual"] for t in tasks.values()),
           "base": score(base, "test")}
    val_scores = {lam: score(merge("task_arithmetic", base, models, f"{work}/ta", scale=lam),
                             "val") for lam in LAMBDAS}
    best = max(val_scores, key=val_scores.get)
    row["task_arithmetic"] = score(merge("task_arithmetic", base, models, f"{work}/ta",
                                         scale=best), "test")
    row["task_arithmetic_lambda"] = best
    rng = np.random.default_rng(seed)
    row["opcm"], row["continual_averaging"], row["orders"] = [], [], []
    for _ in range(orders):
        order = [models[i] for i in rng.permutation(len(models))]
        row["orders"].append([n for n, _ in order])
        row["opcm"].append(score(merge("opcm", base, order, f"{work}/opcm", alpha=alpha), "test"))
        row["continual_averaging"].append(score(running_mean(order, work), "test"))
    return row


def table(rows: list[dict], alpha: float) -> str:
    def cell(values: list[float]) -> str:
        return (f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
                if len(values) > 1 else f"{values[0]:.3f}")

    lines = ["| method | task-aware accuracy (mean ± std over seeds x orders) |", "|---|---|"]
    for label, key in (("individual fine-tunes (upper bound)", "individual"),
                       ("task arithmetic, all at once (λ on validation)", "task_arithmetic"),
                       (f"OPCM, continual (α = {alpha})", "opcm"),
                       ("continual averaging", "continual_averaging"),
                       ("base body + task heads", "base")):
        values = [v for r in rows for v in (r[key] if isinstance(r[key], list) else [r[key]])]
        lines.append(f"| {label} | {cell(values)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--orders", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.5, help="OPCM's α (default 0.5)")
    parser.add_argument("--domains", choices=list(DOMAINS), default="mild",
                        help="mild shifts (rank static merges) or hard ones (interference)")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--smoke", action="store_true", help="1 seed, 1 order, few epochs")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds, orders = (1, 1) if args.smoke else (args.seeds, args.orders)
    epochs = (3, 2) if args.smoke else (40, 15)
    start = time.monotonic()
    rows = []
    for seed in range(seeds):
        with tempfile.TemporaryDirectory(prefix="raymerge-continual-") as work:
            rows.append(one_seed(seed, orders, epochs, work, args.alpha, args.domains))
        print(f"seed {seed}: opcm {statistics.mean(rows[-1]['opcm']):.3f}  continual "
              f"averaging {statistics.mean(rows[-1]['continual_averaging']):.3f}  task "
              f"arithmetic {rows[-1]['task_arithmetic']:.3f}", file=sys.stderr)
    print(table(rows, args.alpha))
    print(f"\n{seeds} seeds x {orders} orders, {time.monotonic() - start:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "seeds": seeds, "orders": orders, "epochs": epochs,
                       "alpha": args.alpha, "domains": args.domains}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
