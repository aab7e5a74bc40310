"""mergekit parity: the same mergekit YAML run by mergekit 0.1.5 (from PyPI, in its own virtual
environment) and by raymerge on a local Ray with 2 workers gives bit-identical tensors.

The virtual environment is built on first use under ~/.cache/raymerge-tests (or
$RAYMERGE_MERGEKIT_VENV); it reuses this interpreter's torch so that both tools do the
same float arithmetic and nothing large is downloaded.
"""

from __future__ import annotations

import subprocess

import pytest
import torch
import yaml

from orchestrator.cli import main
from tests.conftest import load_state

pytestmark = [pytest.mark.integration, pytest.mark.mergekit]


def configs(f):
    """mergekit configs over the tiny Llama family, one per method the issue names."""
    base, ft1, ft2, ft3 = f["base"], f["ft1"], f["ft2"], f["ft3"]
    return {
        "linear": {"models": [{"model": ft1, "parameters": {"weight": 0.3}},
                              {"model": ft2, "parameters": {"weight": 0.5}},
                              {"model": ft3, "parameters": {"weight": 0.2}}],
                   "merge_method": "linear", "dtype": "float32"},
        "linear_bf16_out": {"models": [{"model": ft1, "parameters": {"weight": 1.0}},
                                       {"model": ft2, "parameters": {"weight": 2.0}}],
                            "merge_method": "linear", "parameters": {"normalize": True},
                            "dtype": "float32", "out_dtype": "bfloat16"},
        "task_arithmetic": {"models": [{"model": ft1, "parameters": {"weight": 0.7}},
                                       {"model": ft2, "parameters": {"weight": 0.4}}],
                            "base_model": base, "merge_method": "task_arithmetic",
                            "parameters": {"lambda": 0.8}, "dtype": "float32"},
        "ties": {"models": [{"model": base},
                            {"model": ft1, "parameters": {"weight": 1.0, "density": 0.5}},
                            {"model": ft2, "parameters": {"weight": 0.6, "density": 0.3}},
                            {"model": ft3, "parameters": {"weight": 0.8, "density": 0.7}}],
                 "base_model": base, "merge_method": "ties",
                 "parameters": {"normalize": True, "int8_mask": True}, "dtype": "float32"},
        "ties_sum": {"models": [{"model": ft1, "parameters": {"weight": 1.0}},
                                {"model": ft2, "parameters": {"weight": 1.0}}],
                     "base_model": base, "merge_method": "ties",
                     "parameters": {"density": 0.4, "normalize": False, "lambda": 0.5},
                     "dtype": "float32"},
        "breadcrumbs": {"models": [{"model": ft1, "parameters": {"weight": 0.5, "density": 0.8,
                                                                 "gamma": 0.05}},
                                   {"model": ft2, "parameters": {"weight": 0.5, "density": 0.6,
                                                                 "gamma": 0.02}}],
                        "base_model": base, "merge_method": "breadcrumbs", "dtype": "float32"},
        "slerp": {"models": [{"model": ft1}, {"model": ft2}], "base_model": ft1,
                  "merge_method": "slerp", "parameters": {"t": 0.35}, "dtype": "float32"},
    }


@pytest.mark.parametrize("name", list(configs({k: k for k in ("base", "ft1", "ft2", "ft3")})))
def test_same_yaml_same_tensors(name, mergekit_yaml, llama_family, ray_session, tmp_path,
                                capsys):
    """Every tensor bit-identical (dtype and values) between mergekit and raymerge, run from
    the mergekit YAML on Ray and from its `import-mergekit` translation in-process; the
    config.json of both loads with transformers."""
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(configs(llama_family)[name]))
    proc = subprocess.run([mergekit_yaml, str(path), str(tmp_path / "mk"), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["run", str(path), str(tmp_path / "rm"), "runtime.num_workers=2",
                 "--quiet"]) == 0

    capsys.readouterr()
    assert main(["import-mergekit", str(path), str(tmp_path / "native-out")]) == 0
    (tmp_path / "native.yaml").write_text(capsys.readouterr().out)
    assert main(["run", str(tmp_path / "native.yaml"), "runtime.executor=local", "--quiet"]) == 0
    native = load_state(str(tmp_path / "native-out"))

    theirs, ours = load_state(str(tmp_path / "mk")), load_state(str(tmp_path / "rm"))
    assert native.keys() == ours.keys() and all(torch.equal(native[n], ours[n]) for n in ours)
    assert set(theirs) == set(ours)
    differing = [n for n in theirs
                 if theirs[n].dtype != ours[n].dtype or not torch.equal(theirs[n], ours[n])]
    assert not differing, differing
    first = load_state(configs(llama_family)[name]["models"][-1]["model"])
    assert any(not torch.equal(ours[n], first[n]) for n in ours)  # a real merge happened

    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(str(tmp_path / "rm")).hidden_size == \
        AutoConfig.from_pretrained(str(tmp_path / "mk")).hidden_size
