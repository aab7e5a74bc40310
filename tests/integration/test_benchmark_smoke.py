"""The performance benchmark, small: it runs end to end (inputs generated, both tools run and
watched, I/O floor measured) and raymerge's outputs equal mergekit's for the deterministic
methods. No timing is asserted: timings belong to benchmarks/RESULTS.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.mergekit]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_benchmark_smoke(mergekit_yaml, tmp_path):
    venv = os.path.dirname(os.path.dirname(mergekit_yaml))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "run.py"),
                           "--smoke", "--warm", "--mergekit", venv, "--workdir",
                           str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "smoke: outputs equal mergekit's" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    cells = {c["method"]: c for c in results["cells"]}
    assert set(cells) == {"linear", "task_arithmetic", "ties", "dare_ties"}
    assert cells["linear"]["equal"] and cells["task_arithmetic"]["equal"]
    assert cells["ties"]["equal_sort"]
    # tiny bf16 deltas tie often at the trim threshold: the default index order keeps other
    # tied entries than mergekit's argsort, the same number of them
    assert 0 < cells["ties"]["differing"] < 0.5
    for cell in cells.values():
        for tool in ("mergekit", "raymerge"):
            (run,) = cell["runs"][tool]
            assert run["wall"] > 0 and run["cpu"] > 0 and run["max_rss"] > 0
        assert cell["runs"]["raymerge"][0]["processes"] > 2  # driver, Ray services, workers
        (warm,) = cell["runs"]["warm"]  # the output compared above is the warm run's
        assert warm["wall"] > 0 and warm["max_rss"] > 0
        assert cell["io_floor"]["read"] > 0 and cell["output_bytes"] > 0


def test_continual_benchmark_smoke(tmp_path):
    """The OPCM / continual averaging / task arithmetic benchmark runs end to end (few epochs,
    one seed, one arrival order) and reports every method; its numbers are not ranked here."""
    out = tmp_path / "continual.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "continual.py"),
                           "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    for key in ("individual", "base", "task_arithmetic"):
        assert 0 <= row[key] <= 1
    assert len(row["opcm"]) == len(row["continual_averaging"]) == len(row["orders"]) == 1
    assert sorted(row["orders"][0]) == sorted(["noise", "contrast", "shift", "gamma", "blur",
                                               "erase"])
    assert "OPCM, continual" in proc.stdout


def test_disjoint_quality_benchmark_smoke(tmp_path):
    """The different-init, disjoint-task benchmark runs end to end (width 32, few epochs, one
    seed) and reports every method; its numbers are not ranked here."""
    out = tmp_path / "disjoint.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "quality",
                                                        "disjoint.py"), "--smoke", "--out",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    for key in ("ensemble", "weight_averaging", "weight_matching", "activation_matching",
                "ot_emd", "ot_sinkhorn", "ensemble_wide", "ot_emd_wide", "ot_sinkhorn_wide",
                "pleas_1", "pleas_1.5", "pleas_2",
                "zipit", "mudsc_perm", "mudsc_zip", "zipit_partial_1", "zipit_partial_2"):
        assert 0 <= row[key]["task_aware"] <= 1 and 0 <= row[key]["joint"] <= 1
    assert "ZipIt! (full)" in proc.stdout


@pytest.mark.parametrize("model", ["mlp", "vit"])
def test_multitask_quality_benchmark_smoke(model, tmp_path):
    """The same-base multi-task benchmark runs end to end for both model families (few
    epochs, one seed, one grid point; the ViT also with gating and WEMoE) and reports every
    method; numbers are not ranked."""
    out = tmp_path / "multitask.json"
    extra = ["--dynamic"] if model == "vit" else []  # the runtimes need transformers models
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "quality",
                                                        "multitask.py"), "--smoke", "--model",
                           model, "--out", str(out), *extra], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["rows"]
    for key in ("individual", "base", "averaging", "fisher", "regmean", "task_arithmetic",
                "ties_global", "ties_tensor", "dare_0.5", "dare_0.9", "lines", "consensus",
                "pcb", "tall", "emr"):
        assert 0 <= row[key] <= 1, key
    assert "EMR (task-aware, data-free)" in proc.stdout
    if extra:
        for key in ("gating", "gating_task_aware", "gate_accuracy", "wemoe_init",
                    "wemoe_entropy", "wemoe_distill"):
            assert 0 <= row[key] <= 1, key
        assert "WEMoE, distillation" in proc.stdout
