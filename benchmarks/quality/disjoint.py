"""Merging models that do not share a base, on disjoint tasks (METHODS.md section 7, Suite A).

Two models from different random inits learn sklearn's digits 0-4 and 5-9: MLPs (64 -> W -> W
-> W -> 5, ReLU; ``--model mlp``) or tiny HF ViTs (``--model vit``: 8x8 images, patch 2).
Their bodies are merged with raymerge's alignment code (workers/align); each task keeps its
own head, moved into the merged unit space. Reported on the test split:

* task-aware accuracy: head i on task i's images, averaged over the two tasks;
* joint accuracy: both heads' logits concatenated, argmax over 10 classes.

Methods: weight averaging (no alignment), weight matching (Git Re-Basin; sequential and
colored schedules), activation matching, OT fusion (exact EMD transport on activations or on
weights, and Sinkhorn with its regularisation chosen on validation; for MLPs also of a model
of task B twice as wide into A's widths; for ViTs also EMD followed by a 200-step
distillation fine-tune from both parents), ZipIt! (alpha, beta chosen on a validation split by
joint accuracy), MuDSC permute and zip
(balance f chosen the same way), partial ZipIt! (the first layers merged, each model keeping
its later layers: a multi-head model; a ViT's residual stream permuted, not zipped) and PLeaS
(MLP widths n, 1.5n, 2n; for ViTs as raymerge jobs), next to the individual models and their
output ensemble.
Alignment data: the training images of both tasks, unlabelled.

    python benchmarks/quality/disjoint.py --model mlp --seeds 3 --width 128 --out results.json

``--smoke``: width 32, few epochs, one seed (CI: it runs; numbers are not ranked).
"""

from __future__ import annotations

import argparse
import copy
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
from workers.align.finetune import distill  # noqa: E402
from workers.align.match import _members_of, activation_matching, weight_matching  # noqa: E402
from workers.align.mudsc import mudsc_perm, mudsc_zip  # noqa: E402
from workers.align.ot import fuse, moved, ot_fusion, weight_plans  # noqa: E402
from workers.align.pleas import pleas  # noqa: E402
from workers.align.zip import head, merge, zipit  # noqa: E402

ALPHAS, BETAS = (0.0, 0.3, 0.5), (0.125, 0.5, 1.0)
BALANCES = (0.1, 0.3, 0.5, 0.7, 0.9)  # MuDSC's f
REGS = (0.01, 0.05, 0.2)  # Sinkhorn's regularisation (relative to the largest cost)
class Mlp:
    """64 -> W -> W -> W -> 5, ReLU."""

    head = ["6.weight", "6.bias"]

    def __init__(self, width: int):
        self.width = width

    def make(self) -> nn.Module:
        w = self.width
        return nn.Sequential(nn.Linear(64, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(),
                             nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 5))

    def logits(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return net(x)

    def features(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return net[:-1](x)


class Vit(Mlp):
    """HF ViTForImageClassification: image 8, patch 2, hidden W, 4 heads, MLP 2W, 3 layers,
    no dropout (METHODS.md section 7)."""

    head = ["classifier.weight", "classifier.bias"]

    def make(self) -> nn.Module:
        from transformers import ViTConfig, ViTForImageClassification

        return ViTForImageClassification(ViTConfig(
            image_size=8, patch_size=2, num_channels=1, hidden_size=self.width,
            num_hidden_layers=3, num_attention_heads=4, intermediate_size=2 * self.width,
            num_labels=5, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))

    def logits(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return net(pixel_values=x.view(-1, 1, 8, 8)).logits

    def features(self, net: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return net.vit(pixel_values=x.view(-1, 1, 8, 8)).last_hidden_state[:, 0]


def train(family: Mlp, net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int,
          seed: int) -> None:
    torch.manual_seed(seed)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(family.logits(net, x[idx]), y[idx]).backward()
            opt.step()
    net.eval()


def scores(family: Mlp, body: dict, heads: list[dict], data: dict) -> dict:
    """Task-aware and joint accuracy of a merged body with each task's head."""
    net = family.make().eval()
    net.load_state_dict({**body, **heads[0]})
    layers = []
    for h in heads:
        layer = nn.Linear(h[family.head[0]].shape[1], 5)
        layer.load_state_dict({"weight": h[family.head[0]], "bias": h[family.head[1]]})
        layers.append(layer)
    x, y = data["x"], data["y"]
    with torch.no_grad():
        features = family.features(net, x)
        logits = torch.cat([layers[0](features), layers[1](features)], 1)
    task = y // 5
    aware = statistics.mean(
        float((logits[task == t][:, 5 * t:5 * t + 5].argmax(1) == y[task == t] - 5 * t)
              .float().mean()) for t in (0, 1))
    return {"task_aware": aware, "joint": float((logits.argmax(1) == y).float().mean())}


def one_seed(seed: int, family: Mlp, epochs: int) -> dict:
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
        net = family.make()
        keep = (splits["fit"]["y"] // 5) == t
        train(family, net, splits["fit"]["x"][keep], splits["fit"]["y"][keep] - 5 * t, epochs,
              1000 * seed + t)
        models.append(net)
    a, b = (m.state_dict() for m in models)
    config = models[0].config.to_dict() if hasattr(models[0], "config") else {}
    spec = specs.build({k: tuple(v.shape) for k, v in a.items() if v.is_floating_point()},
                       config)
    batches = list(splits["fit"]["x"].split(256))
    stats = activation_stats(spec, models[0], models[1], batches, family.logits)

    def evaluate(zips, perms, split="test"):
        body = {k: v for k, v in merge(spec, a, b, zips, perms).items()
                if k not in family.head}
        heads = [head(spec, s, i, family.head, zips, perms) for i, s in enumerate((a, b))]
        return scores(family, body, heads, splits[split])

    touching = _members_of(spec)

    def evaluate_ot(solved, split="test", other=b, finetune=0):
        plans, perms = solved
        body = {k: fuse(touching.get(k, []), [v, other[k]], [plans], [perms]).to(v.dtype)
                if v.is_floating_point() else v for k, v in a.items() if k not in family.head}
        heads = [{n: a[n] for n in family.head},
                 {n: moved(other[n], touching.get(n, []), plans, perms).to(other[n].dtype)
                  for n in family.head}]
        if finetune:  # distil the fused ViT from both parents on the unlabelled images
            net = family.make().eval()
            net.load_state_dict({**body, **heads[0]})
            x_fit = splits["fit"]["x"].view(-1, 1, 8, 8)
            with torch.no_grad():
                teachers = [m(pixel_values=x_fit).logits for m in models]
            distill(net, teachers, heads, x_fit, "pixel_values", steps=finetune, lr=1e-3,
                    batch_size=64, seed=seed)
            body = {k: v for k, v in net.state_dict().items() if k not in family.head}
        return scores(family, body, heads, splits[split])

    identity = {g.name: torch.arange(g.size) for g in spec.groups}
    row = {"seed": seed,
           "individual": {"task_aware": statistics.mean(
               _own(family, m, t, splits["test"]) for t, m in enumerate(models)),
               "joint": None},
           "ensemble": _ensemble(family, models, splits["test"]),
           "weight_averaging": evaluate({}, identity),
           "weight_matching": evaluate({}, weight_matching(spec, a, b, seed=seed)[0]),
           "weight_matching_colors": evaluate({}, weight_matching(spec, a, b, seed=seed,
                                                                  schedule="colors")[0]),
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
    row["ot_emd"] = evaluate_ot(ot_fusion(spec, stats, solver="emd"))
    reg = max(REGS, key=lambda r: evaluate_ot(ot_fusion(spec, stats, solver="sinkhorn", reg=r),
                                              split="val")["joint"])
    row["ot_sinkhorn"] = evaluate_ot(ot_fusion(spec, stats, solver="sinkhorn", reg=reg))
    row["ot_sinkhorn_reg"] = reg
    row["ot_emd_weights"] = evaluate_ot(weight_plans(spec, a, b, solver="emd"))
    if isinstance(family, Vit):  # OT fusion + distillation fine-tune (200 steps)
        row["ot_emd_finetuned"] = evaluate_ot(ot_fusion(spec, stats, solver="emd"),
                                              finetune=200)
    # partial zipping: the first layers merged, each model keeping the rest (multi-head)
    for stop in (0, 1, 2) if isinstance(family, Vit) else (1, 2):  # MLP stop 0: the ensemble
        solved, kept = specs.partial(spec, stop)

        def partial(ab, split="test"):
            return _partial(family, spec, a, b, models, zipit(
                spec, stats, alpha=ab[0], beta=ab[1], solved=solved), kept, splits[split])

        best = max(itertools.product(ALPHAS, BETAS), key=lambda ab: partial(ab, "val")["joint"])
        row[f"zipit_partial_{stop}"] = partial(best)
    if isinstance(family, Vit):
        row.update(_pleas_job(models, splits))
        return row
    # PLeaS: partial matching to widths n, 1.5n, 2n, then layer-wise least squares
    corrs = [stats[g.name].correlation() for g in spec.groups]
    x_fit = splits["fit"]["x"]
    for label, factor in (("pleas_1", 1.0), ("pleas_1.5", 1.5), ("pleas_2", 2.0)):
        widths = [int(round(g.size * factor)) for g in spec.groups]
        hidden, heads = pleas([m for m in models[0] if isinstance(m, nn.Linear)],
                              [m for m in models[1] if isinstance(m, nn.Linear)], corrs,
                              widths, x_fit)
        row[label] = _multihead(hidden, heads, splits["test"])
    # wider into narrower: task B learnt by a model twice as wide, fused into A's widths
    wide_family = Mlp(2 * family.width)
    torch.manual_seed(1000 * seed + 2)
    wide = wide_family.make()
    keep = (splits["fit"]["y"] // 5) == 1
    train(wide_family, wide, splits["fit"]["x"][keep], splits["fit"]["y"][keep] - 5, epochs,
          1000 * seed + 2)
    b_wide = wide.state_dict()
    spec_wide = specs.build({k: tuple(v.shape) for k, v in b_wide.items()}, {})
    stats_wide = activation_stats(spec, models[0], wide, batches, family.logits, spec_wide)
    row["ensemble_wide"] = _ensemble(family, [models[0], wide], splits["test"])
    row["ot_emd_wide"] = evaluate_ot(ot_fusion(spec, stats_wide, solver="emd"), other=b_wide)
    reg = max(REGS, key=lambda r: evaluate_ot(ot_fusion(spec, stats_wide, solver="sinkhorn",
                                                        reg=r), "val", b_wide)["joint"])
    row["ot_sinkhorn_wide"] = evaluate_ot(ot_fusion(spec, stats_wide, solver="sinkhorn",
                                                    reg=reg), other=b_wide)
    return row


def _partial(family: Mlp, spec, a: dict, b: dict, models: list[nn.Module], solved,
             kept: list[str], data: dict) -> dict:
    """A multi-head model: the merged first layers shared, each model's ``kept`` layers
    reading the shared features (through its unmerge); scored like the ensemble."""
    zips, perms = solved
    trunk = {k: v for k, v in merge(spec, a, b, zips, perms).items() if k not in kept}
    nets = []
    for i, (state, model) in enumerate(zip((a, b), models)):
        net = copy.deepcopy(model)
        net.load_state_dict({**trunk, **head(spec, state, i, kept, zips, perms)})
        nets.append(net.eval())
    return _ensemble(family, nets, data)


def _pleas_job(models: list[nn.Module], splits: dict) -> dict:
    """PLeaS on the ViTs as raymerge jobs (in-process executor; the unlabelled training
    images as data) at merged MLP widths n, 1.5n and 2n; scored with each source's head."""
    import tempfile

    from safetensors.torch import save_file

    from orchestrator.engine.job import run_job
    from orchestrator.phases.align import load_multihead

    rows = {}
    with tempfile.TemporaryDirectory() as root:
        for i, model in enumerate(models):
            model.save_pretrained(f"{root}/m{i}")
        save_file({"inputs": splits["fit"]["x"].view(-1, 1, 8, 8).contiguous()},
                  f"{root}/data.safetensors")
        for label, width in (("pleas_1", 1.0), ("pleas_1.5", 1.5), ("pleas_2", 2.0)):
            run_job({"sources": [{"name": f"m{i}", "uri": f"{root}/m{i}"} for i in (0, 1)],
                     "merge": {"method": "pleas", "params": {"width": width}},
                     "data": {"uri": f"{root}/data.safetensors", "batch_size": 256},
                     "align": {"heads": ["classifier.*"]},
                     "output": {"uri": f"{root}/{label}"}, "runtime": {"executor": "local"}})
            with torch.no_grad():
                logits = load_multihead(f"{root}/{label}")(
                    pixel_values=splits["test"]["x"].view(-1, 1, 8, 8))
            rows[label] = _metrics([logits["m0"], logits["m1"]], splits["test"])
    return rows


def _multihead(hidden: list, heads: list, data: dict) -> dict:
    """A shared trunk (PLeaS' merged layers) with each model's head: scored as the ensemble."""
    with torch.no_grad():
        h = data["x"]
        for w, b in hidden:
            h = torch.relu(h @ w.T + b)
        return _metrics([h @ w.T + b for w, b in heads], data)


def _metrics(logits: list[torch.Tensor], data: dict) -> dict:
    """Task-aware (head t on task t's images) and joint (argmax over both heads) accuracy."""
    task = data["y"] // 5
    aware = statistics.mean(float((logits[t][task == t].argmax(1) == data["y"][task == t] - 5 * t)
                                  .float().mean()) for t in (0, 1))
    joint = torch.cat(logits, 1).argmax(1)
    return {"task_aware": aware, "joint": float((joint == data["y"]).float().mean())}


def _own(family: Mlp, model: nn.Module, t: int, data: dict) -> float:
    keep = data["y"] // 5 == t
    with torch.no_grad():
        return float((family.logits(model, data["x"][keep]).argmax(1) == data["y"][keep] - 5 * t)
                     .float().mean())


def _ensemble(family: Mlp, models: list[nn.Module], data: dict) -> dict:
    with torch.no_grad():
        logits = torch.cat([family.logits(m, data["x"]) for m in models], 1)
    return {"task_aware": statistics.mean(_own(family, m, t, data)
                                          for t, m in enumerate(models)),
            "joint": float((logits.argmax(1) == data["y"]).float().mean())}


METHODS = (("individual models (own heads)", "individual"), ("output ensemble", "ensemble"),
           ("weight averaging", "weight_averaging"), ("weight matching", "weight_matching"),
           ("weight matching, colored (Jacobi-style) schedule", "weight_matching_colors"),
           ("activation matching", "activation_matching"),
           ("OT fusion, exact transport (EMD)", "ot_emd"),
           ("OT fusion, Sinkhorn (regularisation on validation)", "ot_sinkhorn"),
           ("OT fusion, EMD on a weights cost (no data)", "ot_emd_weights"),
           ("OT fusion (EMD) + distillation fine-tune, 200 steps (ViT)", "ot_emd_finetuned"),
           ("ZipIt! (full)", "zipit"),
           ("MuDSC, permute (f on validation)", "mudsc_perm"),
           ("MuDSC, zip (f on validation, α 0.5, β 1)", "mudsc_zip"),
           ("output ensemble, B twice as wide (MLP)", "ensemble_wide"),
           ("OT fusion of the wider B into A's widths, EMD (MLP)", "ot_emd_wide"),
           ("OT fusion of the wider B into A's widths, Sinkhorn (MLP)", "ot_sinkhorn_wide"),
           ("PLeaS, merged width n", "pleas_1"),
           ("PLeaS, merged width 1.5n", "pleas_1.5"),
           ("PLeaS, merged width 2n", "pleas_2"),
           ("ZipIt! partial: embeddings merged only (ViT)", "zipit_partial_0"),
           ("ZipIt! partial: first layer merged", "zipit_partial_1"),
           ("ZipIt! partial: first two of three layers merged", "zipit_partial_2"))


def table(rows: list[dict]) -> str:
    def cell(key: str, metric: str) -> str:
        values = [r[key][metric] for r in rows]
        if None in values:
            return "-"
        spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.3f}{spread}"

    lines = ["| method | task-aware | joint (10-way) |", "|---|---|---|"]
    lines += [f"| {label} | {cell(k, 'task_aware')} | {cell(k, 'joint')} |"
              for label, k in METHODS if k in rows[0]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["mlp", "vit"], default="mlp")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--width", type=int, help="hidden width (default: mlp 128, vit 64)")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--smoke", action="store_true", help="width 32, 5 epochs, 1 seed")
    args = parser.parse_args()
    torch.set_num_threads(1)
    width = args.width or (128 if args.model == "mlp" else 64)
    seeds, width, epochs = (1, 32, 5) if args.smoke else (args.seeds, width, args.epochs)
    family = (Mlp if args.model == "mlp" else Vit)(width)
    start = time.monotonic()
    rows = [one_seed(seed, family, epochs) for seed in range(seeds)]
    print(table(rows))
    print(f"\n{args.model} width {width}, {seeds} seeds, {time.monotonic() - start:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "model": args.model, "width": width, "epochs": epochs},
                      f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
