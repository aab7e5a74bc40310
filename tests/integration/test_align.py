"""Alignment merges from the CLI on a local Ray: tiny HF ViTs from different inits, unlabelled
inputs in a safetensors file; 1 and 2 workers and the in-process executor agree bit for bit, the
output loads with transformers, each source's head is written, and a model merged with a
permuted copy of itself comes back."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from orchestrator.cli import main
from tests.conftest import load_state
from workers.align import spec as specs

pytestmark = pytest.mark.integration


def tiny_vit(folder, seed, permute_from=None):
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    model = ViTForImageClassification(ViTConfig(image_size=8, patch_size=2, num_channels=1,
                                                hidden_size=16, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=32,
                                                num_labels=5))
    model.save_pretrained(folder)
    if permute_from is not None:  # the weights of another checkpoint, units permuted
        state = load_state(permute_from)
        spec = specs.build({k: tuple(v.shape) for k, v in state.items()},
                           json.loads(open(os.path.join(permute_from, "config.json")).read()))
        perms = specs.random_permutations(spec, torch.Generator().manual_seed(seed))
        save_file({k: v.contiguous() for k, v in specs.apply(spec, perms, state).items()},
                  os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return str(folder)


@pytest.fixture(scope="module")
def vits(tmp_path_factory):
    root = tmp_path_factory.mktemp("vits")
    a = tiny_vit(root / "a", 0)
    data = root / "data.safetensors"
    save_file({"inputs": torch.rand(48, 1, 8, 8, generator=torch.Generator().manual_seed(9))},
              str(data))
    return {"a": a, "b": tiny_vit(root / "b", 1), "a_perm": tiny_vit(root / "ap", 2, a),
            "a_perm2": tiny_vit(root / "ap2", 3, a), "data": str(data)}


def write_job(tmp_path, vits, method, out, second="b", **runtime):
    doc = {"sources": [{"name": "a", "uri": vits["a"]}, {"name": "b", "uri": vits[second]}],
           "merge": {"method": method, "params": {}},
           "data": {"uri": vits["data"], "batch_size": 16},
           "align": {"heads": ["classifier.*"]},
           "output": {"uri": str(out)}, "runtime": runtime}
    path = tmp_path / f"{method}-{out.name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def digests(out):
    manifest = json.loads((out / "raymerge-manifest.json").read_text())
    return {f["file"]: f["sha256"] for f in manifest["shards"] + manifest["files"]
            if not f["file"].endswith(("README.md", ".json"))}


@pytest.mark.parametrize("method", ["zipit", "activation_matching", "weight_matching", "mudsc"])
def test_cli_flow_workers_agree_and_output_loads(method, vits, ray_session, tmp_path):
    from transformers import ViTForImageClassification

    outs = {}
    for label, runtime in (("w1", {"num_workers": 1}), ("w2", {"num_workers": 2}),
                           ("local", {"executor": "local"})):
        outs[label] = tmp_path / label
        assert main(["run", write_job(tmp_path, vits, method, outs[label], **runtime),
                     "--quiet"]) == 0
    assert digests(outs["w1"]) == digests(outs["w2"]) == digests(outs["local"])
    out = outs["w2"]
    assert main(["verify", str(out)]) == 0
    model = ViTForImageClassification.from_pretrained(str(out)).eval()
    heads = {n: load_file(str(out / "heads" / f"{n}.safetensors")) for n in ("a", "b")}
    assert set(heads["a"]) == {"classifier.weight", "classifier.bias"}
    merged = load_state(str(out))
    assert torch.equal(merged["classifier.weight"], heads["a"]["classifier.weight"])
    with torch.no_grad():
        assert torch.isfinite(model(pixel_values=torch.rand(2, 1, 8, 8)).logits).all()


@pytest.mark.parametrize("method", ["zipit", "activation_matching", "weight_matching", "mudsc"])
def test_a_model_merged_with_its_permuted_copy_comes_back(method, vits, tmp_path):
    out = tmp_path / "self"
    assert main(["run", write_job(tmp_path, vits, method, out, second="a_perm",
                                  executor="local"), "--quiet"]) == 0
    merged, original = load_state(str(out)), load_state(vits["a"])
    for name, tensor in original.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["activation_matching", "weight_matching", "mudsc"])
def test_three_models_align_to_the_first(method, vits, ray_session, tmp_path):
    """K = 3: each model is aligned to the first and all are averaged; two permuted copies
    of a model merged with it give it back, on 2 workers as in-process."""
    outs = {}
    for label, runtime in (("w2", {"num_workers": 2}), ("local", {"executor": "local"})):
        path = write_job(tmp_path, vits, method, tmp_path / label, second="a_perm", **runtime)
        doc = yaml.safe_load(open(path))
        doc["sources"].append({"name": "c", "uri": vits["a_perm2"]})
        if method == "mudsc":
            doc["merge"]["params"] = {"variant": "perm"}
        open(path, "w").write(yaml.safe_dump(doc))
        assert main(["run", path, "--quiet"]) == 0
        outs[label] = tmp_path / label
    assert digests(outs["w2"]) == digests(outs["local"])
    merged, original = load_state(str(outs["w2"])), load_state(vits["a"])
    for name, tensor in original.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6)
    assert {p.name for p in (outs["w2"] / "heads").iterdir()} == {
        "a.safetensors", "b.safetensors", "c.safetensors"}


def test_bad_alignment_input_is_named(vits, tmp_path, capsys):
    path = write_job(tmp_path, vits, "zipit", tmp_path / "bad")
    doc = yaml.safe_load(open(path))
    doc["data"]["key"] = "pixels"
    open(path, "w").write(yaml.safe_dump(doc))
    assert main(["run", path, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "data.key" in err and "no tensor 'pixels'" in err
    doc["data"]["key"] = "inputs"
    doc["sources"].append({"name": "c", "uri": vits["a_perm"]})
    open(path, "w").write(yaml.safe_dump(doc))
    assert main(["run", path, "--quiet"]) == 2
    assert "'zipit' merges exactly 2 models, got 3" in capsys.readouterr().err
    del doc["data"]
    open(path, "w").write(yaml.safe_dump(doc))
    assert main(["run", path, "--quiet"]) == 2
    assert "needs unlabelled inputs" in capsys.readouterr().err
