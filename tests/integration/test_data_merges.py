"""Data-aware merges (fisher, regmean) from the CLI on a local Ray: tiny HF ViTs fine-tuned
from one base, each with its own unlabelled inputs. 1 and 2 workers and the in-process
executor agree bit for bit and match a reference built from the pure functions; statistics
are cached in the output and listed in its manifest."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

from orchestrator.cli import main
from tests.conftest import load_state, tiny_vit_finetune
from workers.data_stats import _renamed, fisher_sums, gram_sums, label_generator
from workers.merge.fisher import fisher_average
from workers.merge.regmean import regmean_solve
from workers.models import checkpoint_names

pytestmark = pytest.mark.integration

BATCH = 8


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("fine-tunes")
    out = {"base": tiny_vit_finetune(root / "base")}
    for i, name in enumerate(("a", "b")):
        gen = torch.Generator().manual_seed(20 + i)
        out[name] = tiny_vit_finetune(root / name, 10 + i, head_scale=0.05)
        data = root / f"{name}.safetensors"
        save_file({"inputs": torch.rand(20, 1, 8, 8, generator=gen) + i}, str(data))
        out[f"data_{name}"] = str(data)
    return out


def write_job(tmp_path, family, method, out, params=None, second="b", **runtime):
    doc = {"sources": [{"name": "a", "uri": family["a"],
                        "data": {"uri": family["data_a"], "batch_size": BATCH}},
                       {"name": "b", "uri": family[second],
                        "data": {"uri": family[f"data_{second}"], "batch_size": BATCH}}],
           "merge": {"method": method, "params": params or {}},
           "output": {"uri": str(out)}, "seed": 3, "runtime": runtime}
    path = tmp_path / f"{method}-{out.name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def model(folder):
    from transformers import ViTForImageClassification

    return ViTForImageClassification.from_pretrained(folder).eval()


def reference(family, method):
    """Statistics batch by batch with the workers' pure functions, reduced as documented."""
    from safetensors.torch import load_file

    stats = []
    for name in ("a", "b"):
        net, x = model(family[name]), load_file(family[f"data_{name}"])["inputs"]
        total: dict = {}
        for b, batch in enumerate(x.split(BATCH)):
            part = (fisher_sums(net, batch, "pixel_values", label_generator(3, name, b))
                    if method == "fisher" else gram_sums(net, batch, "pixel_values"))
            part = _renamed(part, checkpoint_names(net))  # the checkpoint's tensor names
            for k, v in part.items():
                total[k] = total[k] + v.double() if k in total else v.double()
        if method == "fisher":
            mean = {k: (v / total["__count__"]).float() for k, v in total.items()
                    if k != "__count__"}
            norm = sum(float(v.double().square().sum()) for v in mean.values()) ** 0.5
            stats.append({k: v / norm for k, v in mean.items()})
        else:
            stats.append({k: v / total[f"{k}/__count__"] for k, v in total.items()
                          if not k.endswith("__count__")})
    states = [load_state(family["a"]), load_state(family["b"])]
    out = {}
    for k in states[0]:
        ts = [s[k] for s in states]
        if method == "fisher":
            fs = [s.get(k, torch.zeros(())) for s in stats]
            out[k] = fisher_average(ts, fs, [1.0, 1.0], 1e-6)
        elif k in stats[0]:
            out[k] = regmean_solve(ts, [s[k] for s in stats], 0.95, 1e-4)
        else:
            out[k] = (ts[0].double() + ts[1].double()).div(2).float()
    return out


def digests(out):
    manifest = json.loads((out / "raymerge-manifest.json").read_text())
    return {f["file"]: f["sha256"] for f in manifest["shards"] + manifest["files"]
            if f["file"].endswith(".safetensors")}


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_workers_agree_and_match_the_reference(method, family, ray_session, tmp_path):
    outs = {}
    for label, runtime in (("w1", {"num_workers": 1}), ("w2", {"num_workers": 2}),
                           ("local", {"executor": "local"})):
        outs[label] = tmp_path / label
        assert main(["run", write_job(tmp_path, family, method, outs[label], **runtime),
                     "--quiet"]) == 0
    assert digests(outs["w1"]) == digests(outs["w2"]) == digests(outs["local"])
    stats = [f for f in digests(outs["w1"]) if f.startswith("raymerge-stats/")]
    kind = "fisher" if method == "fisher" else "grams"
    assert len(stats) == 1 and stats[0].startswith(f"raymerge-stats/{kind}-")
    used = json.loads((outs["w1"] / stats[0].replace(".safetensors", ".json")).read_text())
    assert [(d["model"], d["data"], d["samples"]) for d in used["data"]] == [
        ("a", family["data_a"], 20), ("b", family["data_b"], 20)]

    with safe_open(str(outs["w1"] / stats[0]), "pt") as f:
        covered = {k.split("/", 1)[1] for k in f.keys() if k.startswith("0/")}
    names = set(load_state(family["a"]))
    if method == "fisher":  # every parameter has a gradient, under its checkpoint name
        assert covered - {"__norm__"} == names
    else:  # every Linear weight (4 per layer + 2 MLP, classifier) has a Gram
        assert covered == {n for n in names if n.endswith(".weight")
                           and ("attention" in n or "dense" in n or "classifier" in n)}
    got = load_state(str(outs["w2"]))
    want = reference(family, method)
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6, msg=k)
    merged = model(str(outs["w2"]))
    x = torch.rand(4, 1, 8, 8)
    assert torch.isfinite(merged(pixel_values=x).logits).all()


@pytest.mark.parametrize("method", ["fisher", "regmean"])
def test_a_model_merged_with_itself_comes_back(method, family, ray_session, tmp_path):
    out = tmp_path / "self"
    """Identical weights on different data: Fisher gives the average (the model); RegMean's
    least squares the model too, up to its ridge (taken tiny here)."""
    family = {**family, "a2": family["a"], "data_a2": family["data_b"]}
    params = {"ridge": 1e-9} if method == "regmean" else {}
    assert main(["run", write_job(tmp_path, family, method, out, params, second="a2",
                                  executor="local"), "--quiet"]) == 0
    got, want = load_state(str(out)), load_state(family["a"])
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)


def test_statistics_are_reused_and_data_is_required(family, ray_session, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["run", write_job(tmp_path, family, "regmean", out, executor="local"),
                 "--quiet"]) == 0
    first = digests(out)
    assert main(["run", write_job(tmp_path, family, "regmean", out, {"alpha": 0.5},
                                  executor="local"), "--force"]) == 0
    err = capsys.readouterr().err
    assert "grams: reusing" in err
    again = digests(out)
    assert [f for f in first if "stats" in f] == [f for f in again if "stats" in f]
    assert first != again  # another alpha, another merge

    path = write_job(tmp_path, family, "fisher", tmp_path / "nodata")
    doc = yaml.safe_load(open(path))
    del doc["sources"][1]["data"]
    open(path, "w").write(yaml.safe_dump(doc))
    assert main(["run", path]) == 2
    assert "sources[1].data: method 'fisher' needs each model's unlabelled inputs" in \
        capsys.readouterr().err
