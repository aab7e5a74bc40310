"""Input-dependent merges (wemoe, gating) end to end on tiny HF ViT fine-tunes of one base,
each task with its own head and unlabelled inputs: the runtime's invariants (WEMoE at init is
task arithmetic; a one-hot gate gives the task's model; all layers static is the average),
training on Ray equal to in-process, and ``raymerge predict``."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import save_file

from orchestrator.cli import main
from orchestrator.errors import ConfigError
from orchestrator.phases.dynamic import load, predict
from tests.conftest import load_state, tiny_vit_finetune

pytestmark = pytest.mark.integration

TASKS = ("t0", "t1", "t2")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("dynamic")
    out = {"base": tiny_vit_finetune(root / "base")}
    for k, t in enumerate(TASKS):  # fine-tunes with fresh heads
        out[t] = tiny_vit_finetune(root / t, 10 + k, head_scale=1.0)
        data = root / f"{t}.safetensors"  # each task's inputs: its own brightness range
        gen = torch.Generator().manual_seed(20 + k)
        save_file({"inputs": torch.rand(24, 1, 8, 8, generator=gen) * 0.3 + 0.35 * k},
                  str(data))
        out[f"data_{t}"] = str(data)
    return out


def write_job(tmp_path, family, method, out, params=None, **runtime):
    doc = {"base": {"name": "base", "uri": family["base"]},
           "sources": [{"name": t, "uri": family[t], "data": {"uri": family[f"data_{t}"]}}
                       for t in TASKS],
           "merge": {"method": method, "params": params or {}},
           "align": {"heads": ["classifier.*"]},
           "output": {"uri": str(out)}, "seed": 1, "runtime": runtime}
    path = tmp_path / f"{method}-{out.name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def model_with_head(folder, head_from):
    from transformers import ViTForImageClassification

    model = ViTForImageClassification.from_pretrained(folder).eval()
    own = ViTForImageClassification.from_pretrained(head_from)
    model.classifier.load_state_dict(own.classifier.state_dict())
    return model


def inputs():
    return torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(4))


def test_wemoe_at_init_is_task_arithmetic(family, tmp_path):
    out, ta = tmp_path / "wemoe", tmp_path / "ta"
    assert main(["run", write_job(tmp_path, family, "wemoe", out, {"steps": 0},
                                  executor="local"), "--quiet"]) == 0
    doc = yaml.safe_load(open(write_job(tmp_path, family, "task_arithmetic", ta,
                                        {"scale": 0.3}, executor="local")))
    del doc["align"]
    path = tmp_path / "ta.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["run", str(path), "--quiet"]) == 0
    runtime, x = load(str(out)), inputs()
    described = json.loads((out / "runtime" / "runtime.json").read_text())
    assert len(described["experts"]) == 8 and all(  # fc1, fc2 (weight, bias) of 2 MLPs
        ("intermediate" in n or "output.dense" in n) and "attention" not in n
        for n in described["experts"])
    for t in TASKS:
        with torch.no_grad():
            want = model_with_head(str(ta), family[t])(pixel_values=x).logits
            got = runtime(x, t)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("objective", ["entropy", "distill"])
def test_wemoe_trains_on_ray_as_in_process(objective, family, ray_session, tmp_path):
    outs = {}
    for label, runtime in (("w2", {"num_workers": 2}), ("local", {"executor": "local"})):
        outs[label] = tmp_path / label
        assert main(["run", write_job(tmp_path, family, "wemoe", outs[label],
                                      {"steps": 3, "lr": 1e-2, "objective": objective},
                                      **runtime), "--quiet"]) == 0
    for f in ("router", "experts", "heads"):
        assert (outs["w2"] / "runtime" / f"{f}.safetensors").read_bytes() == \
            (outs["local"] / "runtime" / f"{f}.safetensors").read_bytes()
    described = json.loads((outs["w2"] / "runtime" / "runtime.json").read_text())
    assert described["objective"] == objective and described["losses"]["last"] is not None
    router = load_state(str(outs["w2"] / "runtime"))  # router, experts and heads files
    assert any(k.endswith("fc2.weight") and v.abs().sum() > 0 for k, v in router.items())
    result = predict(str(outs["w2"]), inputs(), "t1")
    assert len(result["predictions"]) == 5
    with pytest.raises(ConfigError, match="WEMoE runs one task's head"):
        predict(str(outs["w2"]), inputs())


def test_gating_invariants_and_predict(family, tmp_path, capsys):
    from transformers import ViTForImageClassification

    out = tmp_path / "gate"
    assert main(["run", write_job(tmp_path, family, "gating", out,
                                  {"threshold": 2.0, "steps": 60, "lr": 1e-2},
                                  executor="local"), "--quiet"]) == 0
    runtime, x = load(str(out)), inputs()
    for k, t in enumerate(TASKS):  # a one-hot gate gives task k's own model and head
        one_hot = torch.zeros(len(x), len(TASKS))
        one_hot[:, k] = 1
        with torch.no_grad():
            got = runtime(x, probabilities=one_hot)
            want = ViTForImageClassification.from_pretrained(family[t]).eval()(
                pixel_values=x).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    described = json.loads((out / "runtime" / "runtime.json").read_text())
    assert described["gate_training_accuracy"] > 0.9  # the tasks' inputs are separable
    data = tmp_path / "batch.safetensors"
    save_file({"inputs": torch.rand(4, 1, 8, 8) * 0.3 + 0.7}, str(data))  # task t2's range
    capsys.readouterr()
    assert main(["predict", str(out), str(data)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tasks"] == ["t2"] * 4 and len(result["predictions"]) == 4

    static = tmp_path / "static"  # every layer static: the models' average, argmax head
    assert main(["run", write_job(tmp_path, family, "gating", static,
                                  {"threshold": -2.0, "steps": 60, "lr": 1e-2},
                                  executor="local"), "--quiet"]) == 0
    runtime = load(str(static))
    assert not json.loads((static / "runtime" / "runtime.json").read_text())["experts"]
    with torch.no_grad():
        p = runtime.probabilities(x)
        got = runtime(x, probabilities=p)
    for b in range(len(x)):
        head = TASKS[int(p[b].argmax())]
        with torch.no_grad():
            want = model_with_head(str(static), family[head])(pixel_values=x[b:b + 1]).logits
        torch.testing.assert_close(got[b:b + 1], want, rtol=1e-4, atol=1e-5)


def test_dynamic_merges_need_heads_and_data(family, tmp_path, capsys):
    path = write_job(tmp_path, family, "gating", tmp_path / "x", executor="local")
    doc = yaml.safe_load(open(path))
    del doc["align"]
    open(path, "w").write(yaml.safe_dump(doc))
    assert main(["run", path]) == 2
    assert "align.heads: gating needs the classifier tensors" in capsys.readouterr().err
    del doc["sources"][0]["data"]
    open(path, "w").write(yaml.safe_dump(doc))
    assert main(["run", path]) == 2
    assert "sources[0].data: method 'gating' needs each model's unlabelled inputs" in \
        capsys.readouterr().err


def test_heads_of_other_shapes_fail_before_training(family, tmp_path, capsys):
    """A task whose head has another number of classes is named before any training step
    (the merge's own shape check came only after training)."""
    from safetensors.torch import load_file

    odd = tmp_path / "t1-3-classes"
    shutil.copytree(family["t1"], odd)
    weights = load_file(str(odd / "model.safetensors"))
    weights["classifier.weight"] = weights["classifier.weight"][:3].clone()
    weights["classifier.bias"] = weights["classifier.bias"][:3].clone()
    save_file(weights, str(odd / "model.safetensors"), metadata={"format": "pt"})
    path = write_job(tmp_path, family, "gating", tmp_path / "x", executor="local")
    doc = yaml.safe_load(open(path))
    doc["sources"][1]["uri"] = str(odd)
    open(path, "w").write(yaml.safe_dump(doc))
    assert main(["run", path]) == 2
    err = capsys.readouterr().err
    assert "source 't1': head tensor classifier.weight has shape (3, 16), t0 has (5, 16)" in err
    assert "step" not in err  # no training progress line


def test_wemoe_names_a_model_without_block_mlps(tmp_path, capsys):
    """BERT's feed-forward is two modules (intermediate, output), not one ``mlp``: refused."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, num_labels=3)
    folders = {}
    for seed, name in enumerate(("base", "a", "b")):
        torch.manual_seed(seed)
        BertForSequenceClassification(config).save_pretrained(tmp_path / name)
        folders[name] = str(tmp_path / name)
    data = tmp_path / "ids.safetensors"
    save_file({"inputs": torch.randint(0, 30, (6, 5))}, str(data))
    doc = {"base": {"name": "base", "uri": folders["base"]},
           "sources": [{"name": n, "uri": folders[n]} for n in ("a", "b")],
           "data": {"uri": str(data)}, "merge": {"method": "wemoe", "params": {"steps": 1}},
           "align": {"heads": ["classifier.*"]}, "output": {"uri": str(tmp_path / "out")},
           "runtime": {"executor": "local"}}
    path = tmp_path / "bert.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert main(["run", str(path), "--quiet"]) == 2
    assert "wemoe: BertForSequenceClassification: no transformer block MLP modules" in \
        capsys.readouterr().err
