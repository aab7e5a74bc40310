"""Same-base multi-task merging on tiny digits tasks (METHODS.md section 7, Suite B).

A base is trained on sklearn's digits; six fine-tunes each learn a transformed copy with a
fresh 10-way head (``--domains mild``: noise, low contrast, 1-px shift, gamma, blur, erase;
``hard``: rot90, rot180, invert, transpose, hflip, 2-px shift). Only the bodies are merged;
each task keeps its head (task-aware accuracy on its test images, averaged over tasks).
Hyper-parameters are chosen on a validation split carved out of the training images.

* ``--model mlp``: 64 -> 128 -> 128 -> 128 (ReLU) bodies, merged by ``raymerge`` jobs
  (in-process executor, real safetensors checkpoints). Fisher and RegMean need a model that
  transformers can build for their statistics pass, so for the MLP they run the workers'
  statistics and merge functions in-process (same code, same reduction, no job).
* ``--model vit``: tiny HF ViTs (image 8, patch 2, hidden 64, 4 heads, MLP 128, 3 layers);
  every method, Fisher and RegMean included, is a ``raymerge`` job (each task's unlabelled
  training images as its ``sources[].data``).

Methods: base body, individual fine-tunes, averaging, task arithmetic (λ), TIES (global and
per-tensor trim, k = 20 %, λ), DARE (p = 0.5 and 0.9, λ), Fisher, RegMean (α), LiNeS (α, β),
consensus (λ_t, λ), PCB (λ), and the task-aware TALL (λ_t per task) and EMR.

    python benchmarks/quality/multitask.py --model mlp --domains mild --seeds 3 --out r.json

``--dynamic`` (ViT) adds the input-dependent merges: gating (gate trained on each task's
unlabelled training images; scored with the head of the task it picks and with each task's own
head) and WEMoE (routers adapted on each task's unlabelled test images, by entropy minimisation
or by distillation from the individual models), as ``raymerge`` jobs run by their runtime.
``--domains all``: the twelve mild and hard tasks together (merges of 12 models);
``--domains tasks``: the "tasks" setting instead of domains: five fine-tunes on disjoint label
sets (digits 0-1, 2-3, ..., plain images), each scored on its own classes.

``--smoke``: one seed, few epochs, small grids (CI: it runs; numbers are not ranked).
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

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from benchmarks.continual import DOMAINS, transform  # noqa: E402
from orchestrator import run_job  # noqa: E402
from orchestrator.phases.dynamic import load as load_runtime  # noqa: E402
from orchestrator.phases.task_aware import task_state  # noqa: E402
from workers.data_stats import fisher_sums, gram_sums, label_generator  # noqa: E402
from workers.merge.fisher import fisher_average  # noqa: E402
from workers.merge.regmean import regmean_solve  # noqa: E402

TASK_SETS = {**DOMAINS, "all": DOMAINS["mild"] + DOMAINS["hard"],
             "tasks": ("digits01", "digits23", "digits45", "digits67", "digits89")}
LAMBDAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
GRIDS = {
    "task_arithmetic": [{"scale": s} for s in LAMBDAS],
    "ties_global": [{"density": 0.2, "scale": s} for s in (0.3, 0.5, 0.7, 1.0, 1.5)],
    "ties_tensor": [{"density": 0.2, "trim_scope": "tensor", "scale": s}
                    for s in (0.3, 0.5, 0.7, 1.0, 1.5)],
    "dare_0.5": [{"density": 0.5, "scale": s} for s in LAMBDAS],
    "dare_0.9": [{"density": 0.1, "scale": s} for s in LAMBDAS],
    "lines": [{"alpha": a, "beta": b} for a in (0.1, 0.2, 0.3) for b in (0.1, 0.3, 0.6)],
    "consensus": [{"mask_lambda": m, "scale": s} for m in (0.2, 0.4, 0.6)
                  for s in (0.2, 0.3, 0.5, 0.7)],
    "pcb": [{"ratio": 0.1, "scale": s} for s in (0.5, 1.0, 1.5, 2.0, 3.0)],
    "regmean": [{"alpha": a} for a in (0.5, 0.8, 0.95)],
}
METHOD_OF = {"ties_global": "ties", "ties_tensor": "ties", "dare_0.5": "dare_linear",
             "dare_0.9": "dare_linear"}
TALL_LAMBDAS = (0.2, 0.3, 0.4, 0.5, 0.6)
DATA_SAMPLES = 256  # unlabelled images per task for Fisher and RegMean (FusionBench's 256)


class Mlp:
    """Bodies 64 -> 128 -> 128 -> 128 (ReLU); checkpoints hold the body only."""

    name = "mlp"

    def make(self) -> nn.Module:
        return Net(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                                 nn.Linear(128, 128), nn.ReLU()), nn.Linear(128, 10))

    def save(self, net: nn.Module, folder: str) -> str:
        os.makedirs(folder, exist_ok=True)
        save_file({k: v.detach().clone().contiguous() for k, v in net.body.state_dict().items()},
                  os.path.join(folder, "model.safetensors"))
        return folder

    def head(self, net: nn.Module) -> dict:
        return {k: v.detach().clone() for k, v in net.head.state_dict().items()}

    def with_head(self, body: dict, head: dict) -> nn.Module:
        net = self.make()
        net.body.load_state_dict(body)
        net.head.load_state_dict(head)
        return net.eval()


class Net(nn.Module):
    """An MLP with the forward signature of an HF image classifier: logits of pixel_values."""

    def __init__(self, body: nn.Module, head: nn.Module):
        super().__init__()
        self.body, self.head = body, head

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(pixel_values.reshape(len(pixel_values), -1)))


class Vit(Mlp):
    """HF ViTForImageClassification; checkpoints hold the whole model, heads are swapped."""

    name = "vit"

    def config(self):
        from transformers import ViTConfig

        return ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64,
                         num_hidden_layers=3, num_attention_heads=4, intermediate_size=128,
                         num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         architectures=["ViTForImageClassification"])

    def make(self) -> nn.Module:
        from transformers import ViTForImageClassification

        return ViTForImageClassification(self.config())

    def save(self, net: nn.Module, folder: str) -> str:
        net.save_pretrained(folder)
        return folder

    def head(self, net: nn.Module) -> dict:
        return {k: v.detach().clone() for k, v in net.classifier.state_dict().items()}

    def with_head(self, body: dict, head: dict) -> nn.Module:
        from transformers import ViTForImageClassification

        net = ViTForImageClassification.from_pretrained(None, config=self.config(),
                                                        state_dict=body).eval()
        net.classifier.load_state_dict(head)
        return net


def logits(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = net(pixel_values=x.reshape(-1, 1, 8, 8))
    return out.logits if hasattr(out, "logits") else out


def train(net: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    torch.manual_seed(seed)
    net.train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(logits(net, x[idx]), y[idx]).backward()
            opt.step()
    net.eval()


def accuracy(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((logits(net, x).argmax(1) == y).float().mean())


def read_state(folder: str) -> dict:
    state = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            state.update(load_file(os.path.join(folder, name)))
    return state


class Setup:
    """One seed: the base, the fine-tunes, their splits and heads."""

    def __init__(self, family: Mlp, domains: str, seed: int, epochs: tuple[int, int],
                 work: str):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        x, y = (digits.data / 16).astype(np.float32), digits.target.astype(np.int64)
        x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, stratify=y,
                                                            random_state=seed)
        x_fit, x_val, y_fit, y_val = train_test_split(x_train, y_train, test_size=0.2,
                                                      stratify=y_train, random_state=seed)
        self.family, self.work, self.seed = family, work, seed
        torch.manual_seed(seed)
        base = family.make()
        train(base, torch.from_numpy(x_fit), torch.from_numpy(y_fit), epochs[0], seed)
        self.base = family.save(base, f"{work}/base")
        self.tasks = {}
        for i, task in enumerate(TASK_SETS[domains]):
            torch.manual_seed(seed * 100 + i)
            net = family.make()
            fresh = family.head(net)
            net.load_state_dict(base.state_dict())
            (net.head if family.name == "mlp" else net.classifier).load_state_dict(fresh)
            splits = [(x_fit, y_fit), (x_val, y_val), (x_test, y_test)]
            if task.startswith("digits"):  # the "tasks" setting: own classes, plain images
                keep = [np.isin(ys, [int(c) for c in task[6:]]) for _, ys in splits]
                splits = [(xs[k], ys[k]) for (xs, ys), k in zip(splits, keep)]
            else:  # a domain: every class, transformed images
                splits = [(transform(task, xs, seed * 10 + i + k), ys)
                          for k, (xs, ys) in enumerate(splits)]
            (fit, y_task), val, test = [(torch.from_numpy(xs), torch.from_numpy(ys))
                                        for xs, ys in splits]
            train(net, fit, y_task, epochs[1], seed * 100 + i)
            data = f"{work}/{task}-inputs.safetensors"
            save_file({"inputs": fit[:DATA_SAMPLES].reshape(-1, 1, 8, 8).contiguous()}, data)
            test_data = f"{work}/{task}-test-inputs.safetensors"  # unlabelled, for TTA
            save_file({"inputs": test[0].reshape(-1, 1, 8, 8).contiguous()}, test_data)
            self.tasks[task] = {"uri": family.save(net, f"{work}/{task}"),
                                "head": family.head(net), "data": data, "fit": fit,
                                "test_data": test_data,
                                "val": val, "test": test, "individual": accuracy(net, *test)}

    def score(self, body: dict, split: str, tasks: list[str] | None = None) -> float:
        """Mean task-aware accuracy of ``body`` with each task's own head."""
        return statistics.mean(
            accuracy(self.family.with_head(body, t["head"]), *t[split])
            for name, t in self.tasks.items() if tasks is None or name in tasks)

    def merge(self, method: str, params: dict, out: str, data: bool = False) -> str:
        sources = []
        for name, t in self.tasks.items():
            src = {"name": name, "uri": t["uri"]}
            if data:
                src["data"] = {"uri": t["data"], "batch_size": 64}
            sources.append(src)
        job = {"sources": sources, "merge": {"method": method, "params": params},
               "output": {"uri": f"{self.work}/{out}"}, "seed": self.seed,
               "runtime": {"executor": "local"}}
        if method not in ("fisher", "regmean", "linear"):
            job["base"] = {"name": "base", "uri": self.base}
        return run_job(job, force=True).output

    def tuned(self, label: str) -> tuple[float, dict]:
        """Test accuracy at the grid point best on validation, and that point."""
        method = METHOD_OF.get(label, label)
        data = method == "regmean" and self.family.name == "vit"
        best, best_val = None, -1.0
        for params in GRIDS[label]:
            body = self.body_of(method, params, data)
            val = self.score(body, "val")
            if val > best_val:
                best, best_val, best_body = params, val, body
        return self.score(best_body, "test"), best

    def body_of(self, method: str, params: dict, data: bool = False) -> dict:
        if method in ("fisher", "regmean") and self.family.name == "mlp":
            return self.in_process(method, params)
        return read_state(self.merge(method, params, method, data))

    def in_process(self, method: str, params: dict) -> dict:
        """Fisher / RegMean of MLP bodies with the workers' statistics and merge functions."""
        states, stats = [], []
        for name, t in self.tasks.items():
            net = self.family.with_head(read_state(t["uri"]), t["head"])
            x = t["fit"][:DATA_SAMPLES]
            if method == "fisher":
                sums = fisher_sums(net, x, "pixel_values", label_generator(self.seed, name, 0))
                part = {k[len("body."):]: v / len(x) for k, v in sums.items()
                        if k.startswith("body.")}
                norm = sum(float(v.double().square().sum()) for v in part.values()) ** 0.5
                stats.append({k: v / norm for k, v in part.items()})
            else:
                sums = gram_sums(net, x, "pixel_values")
                stats.append({k[len("body."):]: v / sums[f"{k}/__count__"] for k, v in sums.items()
                              if k.startswith("body.") and not k.endswith("__count__")})
            states.append(read_state(t["uri"]))
        out = {}
        for k in states[0]:
            values = [s[k] for s in states]
            if method == "fisher":
                out[k] = fisher_average(values, [s[k] for s in stats], [1.0] * len(values), 1e-6)
            elif k in stats[0]:
                out[k] = regmean_solve(values, [s[k] for s in stats], params["alpha"], 1e-4)
            else:
                out[k] = torch.stack(values).mean(0)
        return out

    def dynamic(self, method: str, params: dict, label: str) -> dict:
        """A wemoe / gating job (ViT): the runtime's test accuracy with each task's own head
        and (gating) with the head of the task the gate picks, and the gate's accuracy.
        WEMoE adapts on each task's unlabelled test images (as the paper), the gate learns
        from the unlabelled training images of each task."""
        key = "test_data" if method == "wemoe" else "data"
        job = {"base": {"name": "base", "uri": self.base},
               "sources": [{"name": n, "uri": t["uri"], "data": {"uri": t[key]}}
                           for n, t in self.tasks.items()],
               "merge": {"method": method, "params": params},
               "align": {"heads": ["classifier.*"]},
               "output": {"uri": f"{self.work}/{label}"}, "seed": self.seed,
               "runtime": {"executor": "local"}}
        runtime = load_runtime(run_job(job, force=True).output)
        aware, picked, routed = [], [], []
        with torch.no_grad():
            for k, (name, t) in enumerate(self.tasks.items()):
                x, y = t["test"][0].reshape(-1, 1, 8, 8), t["test"][1]
                aware.append(float((runtime(x, name).argmax(1) == y).float().mean()))
                if method == "gating":
                    p = runtime.probabilities(x)
                    picked.append(float((runtime(x, probabilities=p).argmax(1) == y)
                                        .float().mean()))
                    routed.append(float((p.argmax(1) == k).float().mean()))
        out = {"task_aware": statistics.mean(aware)}
        if picked:
            out.update(gate_head=statistics.mean(picked), gate_accuracy=statistics.mean(routed))
        return out

    def tall(self) -> tuple[float, dict]:
        """TALL: each task's λ_t chosen on its own validation images (a task's mask depends on
        its λ_t only, so one run per λ serves every task)."""
        per_task: dict[str, tuple[float, float]] = {}
        folders = {}
        for lam in TALL_LAMBDAS:
            folders[lam] = self.merge("tall", {"mask_lambda": lam}, f"tall-{lam}")
            for name, t in self.tasks.items():
                net = self.family.with_head(task_state(folders[lam], name), t["head"])
                val = accuracy(net, *t["val"])
                if name not in per_task or val > per_task[name][0]:
                    per_task[name] = (val, lam)
        test = statistics.mean(
            accuracy(self.family.with_head(task_state(folders[per_task[n][1]], n), t["head"]),
                     *t["test"]) for n, t in self.tasks.items())
        return test, {n: lam for n, (_, lam) in per_task.items()}

    def emr(self) -> float:
        out = self.merge("emr", {}, "emr")
        return statistics.mean(
            accuracy(self.family.with_head(task_state(out, n), t["head"]), *t["test"])
            for n, t in self.tasks.items())


def one_seed(family: Mlp, domains: str, seed: int, epochs: tuple[int, int], work: str,
             dynamic: dict | None = None) -> dict:
    s = Setup(family, domains, seed, epochs, work)
    row: dict = {"seed": seed,
                 "individual": statistics.mean(t["individual"] for t in s.tasks.values()),
                 "base": s.score(read_state(s.base), "test"),
                 "averaging": s.score(s.body_of("linear", {}), "test"),
                 "fisher": s.score(s.body_of("fisher", {}, data=True), "test")}
    chosen = {}
    for label in GRIDS:
        row[label], chosen[label] = s.tuned(label)
    row["tall"], chosen["tall"] = s.tall()
    row["emr"] = s.emr()
    row["chosen"] = chosen
    if dynamic is not None:
        gate = s.dynamic("gating", dynamic["gating"], "gating")
        row["gating"], row["gating_task_aware"] = gate["gate_head"], gate["task_aware"]
        row["gate_accuracy"] = gate["gate_accuracy"]
        for objective in ("entropy", "distill"):
            row[f"wemoe_{objective}"] = s.dynamic(
                "wemoe", {**dynamic["wemoe"], "objective": objective,
                          "lr": dynamic["lr"][objective]}, f"wemoe-{objective}")["task_aware"]
        row["wemoe_init"] = s.dynamic("wemoe", {"steps": 0}, "wemoe-init")["task_aware"]
    return row


ROWS = (("individual fine-tunes (upper bound)", "individual"),
        ("EMR (task-aware, data-free)", "emr"), ("TALL masks (task-aware)", "tall"),
        ("RegMean (α on validation)", "regmean"), ("Fisher merging", "fisher"),
        ("task arithmetic (λ on validation)", "task_arithmetic"), ("LiNeS on TA", "lines"),
        ("consensus TA (k = 2)", "consensus"), ("DARE p = 0.5 + TA", "dare_0.5"),
        ("DARE p = 0.9 + TA", "dare_0.9"), ("TIES, global trim k = 20 %", "ties_global"),
        ("TIES, per-tensor trim k = 20 %", "ties_tensor"), ("PCB (r = 0.1)", "pcb"),
        ("weight averaging", "averaging"), ("base body + task heads", "base"))
DYNAMIC_ROWS = (("gating, head of the task the gate picks", "gating"),
                ("gating, each task's own head", "gating_task_aware"),
                ("gate accuracy (inputs routed to their own task)", "gate_accuracy"),
                ("WEMoE at init (= task arithmetic λ 0.3)", "wemoe_init"),
                ("WEMoE, entropy TTA on unlabelled test images", "wemoe_entropy"),
                ("WEMoE, distillation from the individual models", "wemoe_distill"))


def table(rows: list[dict]) -> str:
    lines = ["| method | task-aware accuracy (mean ± std over seeds) |", "|---|---|"]
    for label, key in ROWS + (DYNAMIC_ROWS if "gating" in rows[0] else ()):
        values = [r[key] for r in rows]
        cell = (f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"
                if len(values) > 1 else f"{values[0]:.3f}")
        lines.append(f"| {label} | {cell} |")
    return "\n".join(lines)


def dynamic_params(smoke: bool) -> dict:
    """Gating: 300 gate steps; WEMoE: 200 router steps of 16 inputs per task (entropy at the
    paper's lr 1e-4; distillation at 1e-3)."""
    steps = (5, 2) if smoke else (300, 200)
    return {"gating": {"steps": steps[0], "lr": 1e-3, "threshold": 1.0},
            "wemoe": {"steps": steps[1], "batch_size": 16},
            "lr": {"entropy": 1e-4, "distill": 1e-3}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("mlp", "vit"), default="mlp")
    parser.add_argument("--domains", choices=list(TASK_SETS), default="mild")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--smoke", action="store_true", help="1 seed, few epochs, small grids")
    parser.add_argument("--dynamic", action="store_true",
                        help="also the input-dependent merges, gating and WEMoE (ViT only)")
    args = parser.parse_args()
    if args.dynamic and args.model != "vit":
        parser.error("--dynamic needs --model vit (the runtimes run transformers models)")
    torch.set_num_threads(1)
    family = Mlp() if args.model == "mlp" else Vit()
    seeds, epochs = (1, (3, 2)) if args.smoke else (args.seeds, (40, 15))
    if args.smoke:
        for label in GRIDS:
            GRIDS[label] = GRIDS[label][:1]
        global TALL_LAMBDAS
        TALL_LAMBDAS = TALL_LAMBDAS[:1]
    start = time.monotonic()
    rows = []
    for seed in range(seeds):
        with tempfile.TemporaryDirectory(prefix="raymerge-multitask-") as work:
            rows.append(one_seed(family, args.domains, seed, epochs, work,
                                 dynamic_params(args.smoke) if args.dynamic else None))
        print(f"seed {seed}: " + "  ".join(f"{k} {rows[-1][k]:.3f}" for _, k in ROWS),
              file=sys.stderr)
    print(table(rows))
    print(f"\n{args.model}, {args.domains} domains, {seeds} seeds, "
          f"{time.monotonic() - start:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "model": args.model, "domains": args.domains,
                       "seeds": seeds, "epochs": epochs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
