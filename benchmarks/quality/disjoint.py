"""Merging models that do not share a base, on disjoint tasks (METHODS.md section 7, Suite A).

Two MLPs (64 -> W -> W -> W -> 5, ReLU) from different random inits learn sklearn's digits
0-4 and 5-9. Their bodies are merged with raymerge's alignment code (workers/align); each task
keeps its own head, moved into the merged unit space. Reported on the test split:

* task-aware accuracy: head i on task i's images, averaged over the two tasks;
* joint accuracy: both heads' logits concatenated, argmax over 10 classes.

Methods: weight averaging (no alignment), weight matching (Git Re-Basin), activation matching,
ZipIt! (alpha, beta chosen on a validation split by joint accuracy), MuDSC permute and zip
(balance f chosen the same way), next to the individual models and their output ensemble.
Alignment data: the training images of both tasks, unlabelled.

    python benchmarks/quality/disjoint.py --seeds 3 --width 128 --out results.json

``--smoke``: width 32, few epochs, one seed (CI: it runs; numbers are not ranked).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from workers.align import spec as specs  # noqa: E402
from workers.align.features import activation_stats  # noqa: E402
from workers.align.match import activation_matching, weight_matching  # noqa: E402
from workers.align.mudsc import mudsc_perm, mudsc_zip  # noqa: E402
from workers.align.zip import head, merge, zipit  # noqa: E402

ALPHAS, BETAS = (0.0, 0.3, 0.5), (0.125, 0.5, 1.0)
BALANCES = (0.1, 0.3, 0.5, 0.7, 0.9)  # MuDSC's f
HEAD = ["6.weight", "6.bias"]


def mlp(width: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 5))


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    torch.manual_seed(seed)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()


def scores(body: dict, heads: list[dict], width: int, data: dict) -> dict:
    """Task-aware and joint accuracy of a merged body with each task's head."""
    net = mlp(width)
    net.load_state_dict({**body, **heads[0]})
    trunk = net[:-1].eval()
    layers = []
    for h in heads:
        layer = nn.Linear(width, 5)
        layer.load_state_dict({"weight": h["6.weight"], "bias": h["6.bias"]})
        layers.append(layer)
    x, y = data["x"], data["y"]
    with torch.no_grad():
        features = trunk(x)
        logits = torch.cat([layers[0](features), layers[1](features)], 1)
    task = y // 5
    aware = statistics.mean(
        float((logits[task == t][:, 5 * t:5 * t + 5].argmax(1) == y[task == t] - 5 * t)
              .float().mean()) for t in (0, 1))
    return {"task_aware": aware, "joint": float((logits.argmax(1) == y).float().mean())}


def one_seed(seed: int, width: int, epochs: int) -> dict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data / 16, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.int64)
    idx = np.arange(len(x))
    train_idx, test_idx = train_test_split(idx, test_size=0.3, stratify=y, random_state=seed)
    fit_idx, val_idx = train_test_split(train_idx, test_size=0.2, stratify=y[train_idx],
                                        random_state=seed)
    splits = {name: {"x": x[i], "y": y[i]} for name, i in
              (("fit", fit_idx), ("val", val_idx), ("test", test_idx))}
    models = []
    for t in (0, 1):  # task t: digits 5t .. 5t+4, its own init
        torch.manual_seed(1000 * seed + t)
        net = mlp(width)
        keep = (splits["fit"]["y"] // 5) == t
        train(net, splits["fit"]["x"][keep], splits["fit"]["y"][keep] - 5 * t, epochs,
              1000 * seed + t)
        models.append(net.eval())
    a, b = (m.state_dict() for m in models)
    spec = specs.build({k: tuple(v.shape) for k, v in a.items()})
    batches = list(splits["fit"]["x"].split(256))
    stats = activation_stats(spec, models[0], models[1], batches, lambda m, batch: m(batch))

    def evaluate(zips, perms, split="test"):
        body = {k: v for k, v in merge(spec, a, b, zips, perms).items() if k not in HEAD}
        heads = [head(spec, s, i, HEAD, zips, perms) for i, s in enumerate((a, b))]
        return scores(body, heads, width, splits[split])

    identity = {g.name: torch.arange(g.size) for g in spec.groups}
    row = {"seed": seed,
           "individual": {"task_aware": statistics.mean(
               _own(m, t, splits["test"]) for t, m in enumerate(models)), "joint": None},
           "ensemble": _ensemble(models, splits["test"]),
           "weight_averaging": evaluate({}, identity),
           "weight_matching": evaluate({}, weight_matching(spec, a, b, seed=seed)[0]),
           "activation_matching": evaluate({}, activation_matching(spec, stats))}
    best = max(itertools.product(ALPHAS, BETAS), key=lambda ab: evaluate(
        *zipit(spec, stats, alpha=ab[0], beta=ab[1]), split="val")["joint"])
    row["zipit"] = evaluate(*zipit(spec, stats, alpha=best[0], beta=best[1]))
    row["zipit_alpha_beta"] = list(best)
    f = max(BALANCES, key=lambda f: evaluate({}, mudsc_perm(spec, a, b, stats, f=f, seed=seed),
                                             split="val")["joint"])
    row["mudsc_perm"] = evaluate({}, mudsc_perm(spec, a, b, stats, f=f, seed=seed))
    row["mudsc_perm_f"] = f
    f = max(BALANCES, key=lambda f: evaluate(*mudsc_zip(spec, a, b, stats, f=f, seed=seed),
                                             split="val")["joint"])
    row["mudsc_zip"] = evaluate(*mudsc_zip(spec, a, b, stats, f=f, seed=seed))
    row["mudsc_zip_f"] = f
    return row


def _own(model: nn.Module, t: int, data: dict) -> float:
    keep = data["y"] // 5 == t
    with torch.no_grad():
        return float((model(data["x"][keep]).argmax(1) == data["y"][keep] - 5 * t)
                     .float().mean())


def _ensemble(models: list[nn.Module], data: dict) -> dict:
    with torch.no_grad():
        logits = torch.cat([m(data["x"]) for m in models], 1)
    return {"task_aware": statistics.mean(_own(m, t, data) for t, m in enumerate(models)),
            "joint": float((logits.argmax(1) == data["y"]).float().mean())}


METHODS = (("individual models (own heads)", "individual"), ("output ensemble", "ensemble"),
           ("weight averaging", "weight_averaging"), ("weight matching", "weight_matching"),
           ("activation matching", "activation_matching"), ("ZipIt! (full)", "zipit"),
           ("MuDSC, permute (f on validation)", "mudsc_perm"),
           ("MuDSC, zip (f on validation, α 0.5, β 1)", "mudsc_zip"))


def table(rows: list[dict]) -> str:
    def cell(key: str, metric: str) -> str:
        values = [r[key][metric] for r in rows]
        if None in values:
            return "-"
        spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.3f}{spread}"

    lines = ["| method | task-aware | joint (10-way) |", "|---|---|---|"]
    lines += [f"| {label} | {cell(k, 'task_aware')} | {cell(k, 'joint')} |"
              for label, k in METHODS]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--smoke", action="store_true", help="width 32, 5 epochs, 1 seed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds, width, epochs = (1, 32, 5) if args.smoke else (args.seeds, args.width, args.epochs)
    start = time.monotonic()
    rows = [one_seed(seed, width, epochs) for seed in range(seeds)]
    print(table(rows))
    print(f"\nwidth {width}, {seeds} seeds, {time.monotonic() - start:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "width": width, "epochs": epochs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
