"""Alignment merges from the CLI on a local Ray: tiny HF ViTs from different inits, unlabelled
inputs in a safetensors file; 1 and 2 workers and the in-process executor agree bit for bit, the
output loads with transformers, each source's head is written, and a model merged with a
permuted copy of itself comes back."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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


def write_job(tmp_path, vits, method, out, second="b", params=None, **runtime):
    doc = {"sources": [{"name": "a", "uri": vits["a"]}, {"name": "b", "uri": vits[second]}],
           "merge": {"method": method, "params": params or {}},
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


@pytest.mark.parametrize("method", ["zipit", "activation_matching", "weight_matching", "mudsc",
                                    "ot_fusion"])
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


@pytest.mark.parametrize("method", ["zipit", "activation_matching", "weight_matching", "mudsc",
                                    "ot_fusion"])
def test_a_model_merged_with_its_permuted_copy_comes_back(method, vits, tmp_path):
    out = tmp_path / "self"
    assert main(["run", write_job(tmp_path, vits, method, out, second="a_perm",
                                  executor="local"), "--quiet"]) == 0
    merged, original = load_state(str(out)), load_state(vits["a"])
    for name, tensor in original.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["activation_matching", "weight_matching", "mudsc",
                                    "ot_fusion", "zipit"])
def test_three_models_align_to_the_first(method, vits, ray_session, tmp_path):
    """K = 3: each model is aligned to the first and all are averaged (zipit: one joint zip
    of all three models' units); two permuted copies of a model merged with it give it back,
    on 2 workers as in-process."""
    outs = {}
    for label, runtime in (("w2", {"num_workers": 2}), ("local", {"executor": "local"})):
        path = write_job(tmp_path, vits, method, tmp_path / label, second="a_perm", **runtime)
        doc = yaml.safe_load(open(path))
        doc["sources"].append({"name": "c", "uri": vits["a_perm2"]})
        if method == "mudsc":
            doc["merge"]["params"] = {"variant": "perm"}
        if method == "zipit":  # a fused pair's similarity to the third copy stays 1
            doc["merge"]["params"] = {"alpha": 1.0}
        open(path, "w").write(yaml.safe_dump(doc))
        assert main(["run", path, "--quiet"]) == 0
        outs[label] = tmp_path / label
    assert digests(outs["w2"]) == digests(outs["local"])
    merged, original = load_state(str(outs["w2"])), load_state(vits["a"])
    for name, tensor in original.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6)
    assert {p.name for p in (outs["w2"] / "heads").iterdir()} == {
        "a.safetensors", "b.safetensors", "c.safetensors"}


def test_colored_weight_matching_on_workers(vits, ray_session, tmp_path):
    """``schedule: colors``: groups stepped on workers holding both models; 1 and 2 workers
    and in-process give the same bits, and a permuted copy comes back."""
    outs = {}
    for label, runtime in (("w1", {"num_workers": 1}), ("w2", {"num_workers": 2}),
                           ("local", {"executor": "local"})):
        outs[label] = tmp_path / label
        assert main(["run", write_job(tmp_path, vits, "weight_matching", outs[label],
                                      params={"schedule": "colors"}, **runtime),
                     "--quiet"]) == 0
    assert digests(outs["w1"]) == digests(outs["w2"]) == digests(outs["local"])
    same = tmp_path / "same"
    assert main(["run", write_job(tmp_path, vits, "weight_matching", same, second="a_perm",
                                  params={"schedule": "colors"}, num_workers=2),
                 "--quiet"]) == 0
    merged, original = load_state(str(same)), load_state(vits["a"])
    for name, tensor in original.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6)


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
    doc["merge"]["params"] = {"alpha": 0.0}
    open(path, "w").write(yaml.safe_dump(doc))
    assert main(["run", path, "--quiet"]) == 2
    assert "merge.params.alpha: a zip of 3 models needs alpha > 0" in capsys.readouterr().err
    doc["merge"] = {"method": "mudsc", "params": {"variant": "zip"}}
    open(path, "w").write(yaml.safe_dump(doc))
    assert main(["run", path, "--quiet"]) == 2
    assert "mudsc with variant: zip zips exactly 2 models" in capsys.readouterr().err
    del doc["data"]
    open(path, "w").write(yaml.safe_dump(doc))
    assert main(["run", path, "--quiet"]) == 2
    assert "needs unlabelled inputs" in capsys.readouterr().err
    path = write_job(tmp_path, vits, "mudsc", tmp_path / "bad",
                     params={"variant": "perm", "stop": 1})
    assert main(["run", path, "--quiet"]) == 2
    assert "merge.params.stop: partial merging is for zips" in capsys.readouterr().err


def test_plan_refuses_what_run_would_and_bad_heads_fail_before_ray_and_the_solve(
        vits, tmp_path, capsys):
    """`raymerge plan` refuses a partial stop for a perm variant as `run` does; heads that
    pick no tensor and a data key the inputs lack fail on the driver before Ray starts or
    any statistics or solve runs."""
    path = write_job(tmp_path, vits, "mudsc", tmp_path / "bad",
                     params={"variant": "perm", "stop": 1})
    assert main(["plan", path]) == 2
    assert "merge.params.stop: partial merging is for zips" in capsys.readouterr().err
    for change, message in ((("align", {"heads": ["classifier_nope.*"]}),
                             "align.heads: 'classifier_nope.*' matches no tensor"),
                            (("data", {"uri": vits["data"], "key": "pixels"}),
                             "no tensor 'pixels'")):
        doc = yaml.safe_load(open(write_job(tmp_path, vits, "activation_matching",
                                            tmp_path / "bad")))
        doc[change[0]] = change[1]
        (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc))
        proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run",
                               str(tmp_path / "job.yaml")], capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Ray instance" not in proc.stderr and "statistics" not in proc.stderr
        assert not (tmp_path / "bad").exists()


def test_similarity_of_three_models(vits, ray_session, tmp_path):
    """K x K per layer: cosines of weights (1 on the diagonal, symmetric) and linear CKA of
    activations, which is blind to unit order: a model and its permuted copy have CKA 1 in
    every group while their weights' cosine is below 1. CSV and PNG files per metric."""
    import csv

    path = write_job(tmp_path, vits, "activation_matching", tmp_path / "unused",
                     second="a_perm", num_workers=2)
    doc = yaml.safe_load(open(path))
    doc["sources"].append({"name": "c", "uri": vits["b"]})
    open(path, "w").write(yaml.safe_dump(doc))
    out = tmp_path / "sim"
    assert main(["similarity", path, str(out), "--quiet"]) == 0
    result = json.loads((out / "similarity.json").read_text())
    assert result["models"] == ["a", "b", "c"]
    for matrix in result["weights_cosine"].values():
        m = torch.tensor(matrix)
        torch.testing.assert_close(m, m.T)
        torch.testing.assert_close(m.diagonal(), torch.ones(3, dtype=m.dtype))
    layer0 = torch.tensor(result["weights_cosine"]["vit.encoder.layer.0"])
    assert layer0[0, 1] < 0.99
    assert set(result["cka"]) == {"residual", "mlp.0", "mlp.1", "attention.0", "attention.1"}
    for group, matrix in result["cka"].items():
        m = torch.tensor(matrix)
        assert abs(m[0, 1] - 1) < 1e-6, group  # a and its permuted copy
        assert m[0, 2] < 0.999, group  # another init
    rows = list(csv.reader(open(out / "cka.csv")))
    assert rows[0] == ["layer", "model", "other", "cka"] and len(rows) == 1 + 5 * 9
    from matplotlib.image import imread

    png = (out / "weights_cosine.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = imread(out / "weights_cosine.png")  # labelled panels: one per layer, 4 per row
    rows = -(-len(result["weights_cosine"]) // 4)
    assert image.shape[0] > 100 * rows and image.shape[1] > 300 and image.std() > 0


def test_statistics_are_reused_from_the_output(vits, tmp_path, capsys):
    """A re-run into the same output with another activation method reads the statistics the
    first run kept, and gives the bytes a fresh run gives."""
    out = tmp_path / "cached"
    path = write_job(tmp_path, vits, "zipit", out, executor="local")
    assert main(["run", path]) == 0
    assert "reusing" not in capsys.readouterr().err
    doc = yaml.safe_load(open(path))
    doc["merge"]["method"] = "activation_matching"
    open(path, "w").write(yaml.safe_dump(doc))
    assert main(["run", path, "--force"]) == 0
    assert "activation statistics: reusing" in capsys.readouterr().err
    fresh = tmp_path / "fresh"
    assert main(["run", write_job(tmp_path, vits, "activation_matching", fresh,
                                  executor="local"), "--quiet"]) == 0
    assert digests(out) == digests(fresh)


def test_multihead_loader_gives_each_source_its_head(vits, tmp_path):
    """load_multihead: one logits tensor per source; source a's equals the saved body's own
    output, source b's the body with b's moved head."""
    from transformers import ViTForImageClassification

    from orchestrator.phases.align import load_multihead

    out = tmp_path / "mh"
    assert main(["run", write_job(tmp_path, vits, "zipit", out, executor="local"),
                 "--quiet"]) == 0
    multi = load_multihead(str(out))
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = multi(pixel_values=x)
        assert set(logits) == {"a", "b"}
        body = ViTForImageClassification.from_pretrained(str(out)).eval()
        torch.testing.assert_close(logits["a"], body(pixel_values=x).logits)
        head_b = load_file(str(out / "heads" / "b.safetensors"))
        body.load_state_dict(head_b, strict=False)
        torch.testing.assert_close(logits["b"], body(pixel_values=x).logits)
        assert not torch.allclose(logits["a"], logits["b"])


@pytest.mark.parametrize("params", [{"stop": 1}, {"variant": "zip", "stop": 0}])
def test_partial_zip_writes_each_sources_kept_layers(params, vits, ray_session, tmp_path):
    """Partial zipping from the CLI: the embeddings and first ``stop`` blocks merged, each
    source's later blocks, final norm and classifier under heads/ (checkpoint names); 1 and 2
    workers agree; the multi-head loader runs each source's path; with a permuted copy of
    the model every path computes the model."""
    from orchestrator.engine.job import run_job
    from orchestrator.errors import ConfigError
    from orchestrator.phases.align import load_multihead

    method = "mudsc" if "variant" in params else "zipit"
    outs = {}
    for label, runtime in (("w1", {"num_workers": 1}), ("w2", {"num_workers": 2})):
        outs[label] = tmp_path / label
        assert main(["run", write_job(tmp_path, vits, method, outs[label], params=params,
                                      **runtime), "--quiet"]) == 0
    assert digests(outs["w1"]) == digests(outs["w2"])
    out = outs["w2"]
    heads = {n: load_file(str(out / "heads" / f"{n}.safetensors")) for n in ("a", "b")}
    first_kept = params["stop"]  # the first block each source keeps
    assert f"vit.encoder.layer.{first_kept}.output.dense.weight" in heads["b"]
    assert {"vit.layernorm.weight", "classifier.weight"} <= set(heads["b"])
    merged_part = ("vit.embeddings",) + tuple(f"vit.encoder.layer.{i}."
                                              for i in range(params["stop"]))
    assert not any(k.startswith(merged_part) for k in heads["b"])
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        logits = load_multihead(str(out))(pixel_values=x)
        assert not torch.allclose(logits["a"], logits["b"])

    same = tmp_path / "same"
    assert main(["run", write_job(tmp_path, vits, method, same, second="a_perm",
                                  params=params, executor="local"), "--quiet"]) == 0
    from transformers import ViTForImageClassification

    original = ViTForImageClassification.from_pretrained(vits["a"]).eval()
    with torch.no_grad():
        logits = load_multihead(str(same))(pixel_values=x)
        for name in ("a", "b"):
            torch.testing.assert_close(logits[name], original(pixel_values=x).logits,
                                       rtol=1e-4, atol=1e-5)

    path = write_job(tmp_path, vits, method, tmp_path / "far", params={**params, "stop": 3},
                     executor="local")
    with pytest.raises(ConfigError, match=r"merge.params.stop: stop 3 outside \[0, 2\]"):
        run_job(path)


def widened_vit(folder, source):
    """``source`` with every MLP hidden unit duplicated (shuffled) and its outgoing weights
    halved: the same function, intermediate_size twice as large."""
    from transformers import ViTConfig, ViTForImageClassification

    narrow = ViTForImageClassification.from_pretrained(source).eval()
    config = ViTConfig.from_pretrained(source)
    config.intermediate_size *= 2
    wide = ViTForImageClassification(config).eval()
    n = narrow.config.intermediate_size
    idx = torch.cat([torch.arange(n)] * 2)[torch.randperm(2 * n,
                                                          generator=torch.Generator().manual_seed(3))]
    state = {}
    for k, v in narrow.state_dict().items():
        want = wide.state_dict()[k].shape
        if v.shape == want:
            state[k] = v
        elif v.shape[0] == n:  # fc1: rows are the hidden units
            state[k] = v[idx]
        else:  # fc2: columns read them
            state[k] = v[:, idx] / 2
    wide.load_state_dict(state)
    x = torch.rand(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(wide(pixel_values=x).logits, narrow(pixel_values=x).logits,
                                   rtol=1e-4, atol=1e-5)
    wide.save_pretrained(folder)
    return str(folder)


def test_ot_fusion_of_a_wider_model_keeps_the_anchor_shapes(vits, ray_session, tmp_path):
    """Wider into narrower: a function-preserving copy with twice the MLP width fuses back
    into the anchor (the same bits on 1 and 2 workers and in-process; the anchor's shapes,
    loaded by transformers; the other head moved into the anchor's units). Other widths are
    refused for the other methods, and where attention heads would differ."""
    from transformers import ViTForImageClassification

    vits = {**vits, "a_wide": widened_vit(tmp_path / "wide", vits["a"])}
    outs = {}
    for label, runtime in (("w1", {"num_workers": 1}), ("w2", {"num_workers": 2}),
                           ("local", {"executor": "local"})):
        outs[label] = tmp_path / label
        assert main(["run", write_job(tmp_path, vits, "ot_fusion", outs[label], second="a_wide",
                                      **runtime), "--quiet"]) == 0
    assert digests(outs["w1"]) == digests(outs["w2"]) == digests(outs["local"])
    merged, original = load_state(str(outs["w2"])), load_state(vits["a"])
    for name, tensor in original.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-5, msg=name)
    heads = load_file(str(outs["w2"] / "heads" / "b.safetensors"))
    assert heads["classifier.weight"].shape == original["classifier.weight"].shape

    model = ViTForImageClassification.from_pretrained(str(outs["w2"]))
    assert model.config.intermediate_size == 32

    from transformers import ViTConfig

    from orchestrator.engine.job import run_job
    from orchestrator.errors import PlanError

    path = write_job(tmp_path, vits, "activation_matching", tmp_path / "am", second="a_wide",
                     executor="local")
    with pytest.raises(PlanError, match="other widths: ot_fusion only"):
        run_job(path)
    config = ViTConfig.from_pretrained(vits["a"])
    config.hidden_size = 24  # head dims 6, not 4
    ViTForImageClassification(config).save_pretrained(tmp_path / "broad")
    vits["broad"] = str(tmp_path / "broad")
    path = write_job(tmp_path, vits, "ot_fusion", tmp_path / "broad-out", second="broad",
                     executor="local")
    with pytest.raises(PlanError, match="attention group .* has 24 dims, a 16"):
        run_job(path)


def _distance_to_parents(out, vits, x):
    """Σ over sources of KL(parent ‖ the output's path with that source's head)."""
    from torch.nn import functional as F
    from transformers import ViTForImageClassification

    from orchestrator.phases.align import load_multihead

    with torch.no_grad():
        fused = load_multihead(str(out))(pixel_values=x)
        total = 0.0
        for name in ("a", "b"):
            parent = ViTForImageClassification.from_pretrained(vits[name]).eval()
            target = F.softmax(parent(pixel_values=x).logits, -1)
            total += float(F.kl_div(F.log_softmax(fused[name], -1), target,
                                    reduction="batchmean"))
    return total


def test_ot_fusion_distillation_fine_tune(vits, ray_session, tmp_path, capsys):
    """``finetune_steps``: the fused model is distilled from its parents in one Ray task;
    the same bits on 1 and 2 workers and in-process; each source's path moves closer to its
    parent on the data; the trained tensors are kept next to the transforms."""
    outs = {}
    params = {"finetune_steps": 40, "finetune_lr": 1e-3}
    for label, runtime in (("w1", {"num_workers": 1}), ("w2", {"num_workers": 2}),
                           ("local", {"executor": "local"})):
        outs[label] = tmp_path / label
        assert main(["run", write_job(tmp_path, vits, "ot_fusion", outs[label], params=params,
                                      **runtime)]) == 0
    assert "distillation fine-tune: 40 steps" in capsys.readouterr().err
    assert digests(outs["w1"]) == digests(outs["w2"]) == digests(outs["local"])
    assert (outs["w2"] / "raymerge-align" / "finetuned.safetensors").exists()
    plain = tmp_path / "plain"
    assert main(["run", write_job(tmp_path, vits, "ot_fusion", plain, executor="local"),
                 "--quiet"]) == 0
    x = load_file(vits["data"])["inputs"]
    assert _distance_to_parents(outs["w2"], vits, x) < 0.8 * _distance_to_parents(plain, vits, x)
    heads = load_file(str(outs["w2"] / "heads" / "b.safetensors"))
    assert torch.equal(heads["classifier.weight"],
                       load_file(str(plain / "heads" / "b.safetensors"))["classifier.weight"])


def test_ot_fusion_from_weights_needs_no_data(vits, ray_session, tmp_path):
    """``cost: weights``: no statistics pass (no data in the job); 1 worker and in-process
    agree; a permuted copy comes back; a fine-tune without data is refused by name."""
    from orchestrator.engine.job import run_job
    from orchestrator.errors import ConfigError

    outs = {}
    for label, second, runtime in (("w1", "b", {"num_workers": 1}),
                                   ("local", "b", {"executor": "local"}),
                                   ("same", "a_perm", {"executor": "local"})):
        path = write_job(tmp_path, vits, "ot_fusion", tmp_path / label, second=second,
                         params={"cost": "weights"}, **runtime)
        doc = yaml.safe_load(open(path))
        del doc["data"]
        open(path, "w").write(yaml.safe_dump(doc))
        assert main(["run", path, "--quiet"]) == 0
        outs[label] = tmp_path / label
    assert digests(outs["w1"]) == digests(outs["local"])
    assert not list((outs["w1"] / "raymerge-align").glob("stats-*"))
    merged, original = load_state(str(outs["same"])), load_state(vits["a"])
    for name, tensor in original.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-5, atol=1e-6)
    doc["merge"]["params"]["finetune_steps"] = 5
    doc["output"]["uri"] = str(tmp_path / "ft")
    open(path, "w").write(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="finetune_steps: the fine-tune needs unlabelled"):
        run_job(path)


def test_pleas_job_writes_the_merged_width(vits, ray_session, tmp_path):
    """PLeaS from the CLI: the MLPs fitted block by block at width 1.5n, in rounds of Ray
    tasks, then each source's head refitted; 1 and 2 workers and in-process agree;
    config.json carries the new intermediate_size and the output loads and verifies; the body
    holds the first source's head; a model merged with a permuted copy of itself at width n
    computes the model."""
    from transformers import ViTForImageClassification

    from orchestrator.phases.align import load_multihead

    outs = {}
    for label, runtime in (("w1", {"num_workers": 1}), ("w2", {"num_workers": 2}),
                           ("local", {"executor": "local"})):
        outs[label] = tmp_path / label
        assert main(["run", write_job(tmp_path, vits, "pleas", outs[label],
                                      params={"width": 1.5}, **runtime), "--quiet"]) == 0
    assert digests(outs["w1"]) == digests(outs["w2"]) == digests(outs["local"])
    out = outs["w2"]
    assert main(["verify", str(out)]) == 0
    model = ViTForImageClassification.from_pretrained(str(out))
    assert model.config.intermediate_size == 48
    body = load_state(str(out))
    assert body["vit.encoder.layer.1.intermediate.dense.weight"].shape == (48, 16)
    heads = {n: load_file(str(out / "heads" / f"{n}.safetensors")) for n in ("a", "b")}
    assert torch.equal(body["classifier.weight"], heads["a"]["classifier.weight"])
    assert not torch.equal(heads["a"]["classifier.weight"], heads["b"]["classifier.weight"])
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert set(load_multihead(str(out))(pixel_values=x)) == {"a", "b"}

    same = tmp_path / "same"
    assert main(["run", write_job(tmp_path, vits, "pleas", same, second="a_perm",
                                  executor="local"), "--quiet"]) == 0
    original = ViTForImageClassification.from_pretrained(vits["a"]).eval()
    merged = ViTForImageClassification.from_pretrained(str(same)).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(pixel_values=x).logits,
                                   original(pixel_values=x).logits, rtol=1e-3, atol=1e-3)
