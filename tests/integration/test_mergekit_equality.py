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
        "breadcrumbs_ties": {"models": [{"model": ft1, "parameters": {"weight": 0.7}},
                                        {"model": ft2, "parameters": {"weight": 0.5}}],
                             "base_model": base, "merge_method": "breadcrumbs_ties",
                             "parameters": {"density": 0.7, "gamma": 0.03, "normalize": True},
                             "dtype": "float32"},
        "slerp": {"models": [{"model": ft1}, {"model": ft2}], "base_model": ft1,
                  "merge_method": "slerp", "parameters": {"t": 0.35}, "dtype": "float32"},
        # mergekit's own example config: slices, filters, gradients over the layers
        "slerp_filters_gradients": {
            "slices": [{"sources": [{"model": ft1, "layer_range": [0, 3]},
                                    {"model": ft2, "layer_range": [0, 3]}]}],
            "merge_method": "slerp", "base_model": ft1,
            "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                 {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                                 {"value": 0.5}]},
            "dtype": "bfloat16"},
        "linear_model_gradients": {
            "models": [{"model": ft1, "parameters": {"weight": [0.2, 1.0, 0.4]}},
                       {"model": ft2, "parameters": {"weight": [{"filter": "mlp",
                                                                  "value": [1.0, 0.1]},
                                                                 {"value": 0.7}]}},
                       {"model": ft3}],
            "merge_method": "linear", "parameters": {"weight": 0.3}, "dtype": "float32"},
        "ties_filtered_density": {
            "models": [{"model": ft1, "parameters": {"weight": 1.0}},
                       {"model": ft2, "parameters": {"weight": 0.5,
                                                     "density": {"filter": "down_proj",
                                                                 "value": 0.9}}}],
            "base_model": base, "merge_method": "ties",
            "parameters": {"density": [{"filter": "self_attn", "value": 0.3},
                                       {"filter": "mlp", "value": [0.2, 0.8]},
                                       {"value": 0.6}]},
            "dtype": "float32"},
        "nearswap": {"models": [{"model": ft1}], "base_model": base, "merge_method": "nearswap",
                     "parameters": {"t": 0.002}, "dtype": "float32"},
        "multislerp": {"models": [{"model": ft1, "parameters": {"weight": 0.5}},
                                  {"model": ft2, "parameters": {"weight": 0.3}},
                                  {"model": ft3, "parameters": {"weight": 0.2}}],
                       "merge_method": "multislerp", "dtype": "float32"},
        "multislerp_base": {"models": [{"model": ft1, "parameters": {"weight": 1.0}},
                                       {"model": ft2, "parameters": {"weight": 2.0}}],
                            "base_model": base, "merge_method": "multislerp",
                            "parameters": {"normalize_weights": False}, "dtype": "float32"},
        "karcher": {"models": [{"model": ft1}, {"model": ft2}, {"model": ft3}],
                    "merge_method": "karcher", "parameters": {"max_iter": 5},
                    "dtype": "bfloat16"},
        "nuslerp_base": {"models": [{"model": ft1, "parameters": {"weight": 0.3}},
                                    {"model": ft2, "parameters": {"weight": 0.7}}],
                         "base_model": base, "merge_method": "nuslerp", "dtype": "float32"},
        "nuslerp_rows": {"models": [{"model": ft1, "parameters": {"weight": 2.0}},
                                    {"model": ft2, "parameters": {"weight": 1.0}}],
                         "merge_method": "nuslerp",
                         "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
                         "dtype": "float32"},
        "sce": {"models": [{"model": ft1}, {"model": ft2}, {"model": ft3}], "base_model": base,
                "merge_method": "sce", "parameters": {"select_topk": 0.4, "int8_mask": True},
                "dtype": "float32"},
        "arcee_fusion": {"models": [{"model": ft2}], "base_model": base,
                         "merge_method": "arcee_fusion", "dtype": "float32"},
        "ram": {"models": [{"model": ft1}, {"model": ft2}, {"model": ft3}], "base_model": base,
                "merge_method": "ram", "parameters": {"epsilon": 0.002}, "dtype": "float32"},
        "ramplus_tl": {"models": [{"model": ft1}, {"model": ft2}], "base_model": base,
                       "merge_method": "ramplus_tl",
                       "parameters": {"epsilon": 0.003, "r": 0.5, "alpha": 0.4},
                       "dtype": "float32"},
        # layer ranges per slice, parameters at slice and slice-source level
        "task_arithmetic_slices": {
            "slices": [{"sources": [{"model": ft1, "layer_range": [0, 2],
                                     "parameters": {"weight": 0.9}},
                                    {"model": ft2, "layer_range": [0, 2]},
                                    {"model": base, "layer_range": [0, 2]}],
                        "parameters": {"weight": 0.4}},
                       {"sources": [{"model": ft1, "layer_range": [2, 3]},
                                    {"model": ft2, "layer_range": [2, 3]},
                                    {"model": base, "layer_range": [2, 3]}],
                        "parameters": {"weight": [0.1, 0.6]}}],
            "base_model": base, "merge_method": "task_arithmetic", "dtype": "float32"},
        # a frankenmerge: 2 layers of ft1 then 2 of ft2 (one repeated), 4 layers in all
        "passthrough_frankenmerge": {
            "slices": [{"sources": [{"model": ft1, "layer_range": [0, 2]}]},
                       {"sources": [{"model": ft2, "layer_range": [1, 3]}]}],
            "merge_method": "passthrough", "dtype": "float32"},
    }


def _last_input(cfg: dict) -> str:
    if "models" in cfg:
        return cfg["models"][-1]["model"]
    return cfg["slices"][-1]["sources"][-1]["model"]


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

    for out in ("mk", "rm"):  # the config as given, where the hub looks for it
        assert (tmp_path / out / "mergekit_config.yml").read_text() == path.read_text(), out
    assert not (tmp_path / "native-out" / "mergekit_config.yml").exists()

    theirs, ours = load_state(str(tmp_path / "mk")), load_state(str(tmp_path / "rm"))
    assert native.keys() == ours.keys() and all(torch.equal(native[n], ours[n]) for n in ours)
    assert set(theirs) == set(ours)
    differing = [n for n in theirs
                 if theirs[n].dtype != ours[n].dtype or not torch.equal(theirs[n], ours[n])]
    assert not differing, differing
    last = load_state(_last_input(configs(llama_family)[name]))
    assert any(n not in last or not torch.equal(ours[n], last[n]) for n in ours)  # merged

    from transformers import AutoConfig

    theirs_cfg = AutoConfig.from_pretrained(str(tmp_path / "mk"))
    ours_cfg = AutoConfig.from_pretrained(str(tmp_path / "rm"))
    assert (ours_cfg.hidden_size, ours_cfg.num_hidden_layers) == \
        (theirs_cfg.hidden_size, theirs_cfg.num_hidden_layers)


# mergekit 0.1.5 writes these two as float32 under `dtype: bfloat16` (a float32 mask or
# scale promotes its kernel's result, and nothing casts it back); raymerge writes the dtype
# asked for, the same values rounded to it
_BF16_PROMOTED = {"arcee_fusion", "ramplus_tl"}
_BF16_NAMES = [n for n in configs({k: k for k in ("base", "ft1", "ft2", "ft3")})
               if n not in _BF16_PROMOTED]
# every bf16 config through mergekit in one process (its start-up, about 5 s, once)
_MERGE_ALL = """
import sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
for path, out in zip(sys.argv[1::2], sys.argv[2::2]):
    text = open(path, encoding="utf-8").read()
    run_merge(MergeConfiguration.model_validate(yaml.safe_load(text)), out,
              options=MergeOptions(), config_source=text)
"""


@pytest.fixture(scope="module")
def bf16_merges(mergekit_yaml, tmp_path_factory) -> tuple[dict, dict]:
    """The Llama family of conftest stored in bfloat16, and mergekit's output of every
    config with `dtype: bfloat16` on it: (configs by name, mergekit output folder by name)."""
    import os

    from tests.conftest import tiny_llama

    root = tmp_path_factory.mktemp("llama-bf16")
    base = tiny_llama(str(root / "base"), seed=0, dtype=torch.bfloat16)
    family = {"base": base, **{f"ft{i}": tiny_llama(str(root / f"ft{i}"), seed=i, base=base,
                                                    dtype=torch.bfloat16) for i in (1, 2, 3)}}
    docs = {n: {**configs(family)[n], "dtype": "bfloat16"} for n in _BF16_NAMES}
    args = []
    for name, doc in docs.items():
        (root / f"{name}.yml").write_text(yaml.safe_dump(doc))
        args += [str(root / f"{name}.yml"), str(root / f"{name}-mk")]
    python = os.path.join(os.path.dirname(mergekit_yaml), "python")
    proc = subprocess.run([python, "-c", _MERGE_ALL, *args], capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return docs, {n: str(root / f"{n}-mk") for n in docs}


@pytest.mark.parametrize("name", _BF16_NAMES)
def test_same_yaml_same_tensors_in_bfloat16(name, bf16_merges, tmp_path):
    """With `dtype: bfloat16` (bf16 checkpoints, bf16 arithmetic where mergekit does it in
    bf16, float32 where its kernels promote, as linear's sum) every tensor is bit-identical.
    TIES-family configs ask for mergekit's tie-breaking (`trim_ties: sort`): bf16 magnitudes
    tie at the trim threshold far more often than float32 ones."""
    docs, mergekit_out = bf16_merges
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(docs[name]))
    sort = (["merge.params.trim_ties=sort"]
            if docs[name]["merge_method"] in ("ties", "dare_ties", "della") else [])
    assert main(["run", str(path), str(tmp_path / "rm"), "runtime.executor=local", *sort,
                 "--quiet"]) == 0
    theirs, ours = load_state(mergekit_out[name]), load_state(str(tmp_path / "rm"))
    assert set(theirs) == set(ours)
    differing = [n for n in theirs
                 if theirs[n].dtype != ours[n].dtype or not torch.equal(theirs[n], ours[n])]
    assert not differing, differing


def test_frankenmerge_runs_in_transformers(mergekit_yaml, llama_family, ray_session, tmp_path):
    """The stacked model loads with transformers (4 layers from two 3-layer models) and
    computes the same logits as mergekit's output; its layer 2 is ft2's layer 1."""
    from transformers import LlamaForCausalLM

    path = tmp_path / "franken.yml"
    path.write_text(yaml.safe_dump(configs(llama_family)["passthrough_frankenmerge"]))
    assert main(["run", str(path), str(tmp_path / "rm"), "runtime.num_workers=2",
                 "--quiet"]) == 0
    proc = subprocess.run([mergekit_yaml, str(path), str(tmp_path / "mk"), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    logits = []
    for out in ("rm", "mk"):
        model = LlamaForCausalLM.from_pretrained(str(tmp_path / out)).eval()
        assert len(model.model.layers) == 4
        with torch.no_grad():
            logits.append(model(ids).logits)
    assert torch.equal(logits[0], logits[1]) and torch.isfinite(logits[0]).all()
    ours, ft2 = load_state(str(tmp_path / "rm")), load_state(llama_family["ft2"])
    assert torch.equal(ours["model.layers.2.mlp.up_proj.weight"],
                       ft2["model.layers.1.mlp.up_proj.weight"])


def _run_both(mergekit_yaml, tmp_path, config):
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run([mergekit_yaml, str(path), str(tmp_path / "mk"), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(["run", str(path), str(tmp_path / "rm"), "runtime.num_workers=2",
                 "--quiet"]) == 0


def test_dare_keeps_the_same_fraction(mergekit_yaml, llama_family, ray_session, tmp_path):
    """DARE's masks are random in both tools (mergekit: torch's global RNG, raymerge: keyed
    per seed, model, tensor and chunk), so only the sampling law can agree: with one model, no
    rescale and weight 1 the output is base + mask * τ, kept entries unchanged, and the kept
    fraction is the density for both (8 000 entries: 0.03 is over 4 standard deviations)."""
    base, ft = llama_family["base"], llama_family["ft1"]
    _run_both(mergekit_yaml, tmp_path, {
        "models": [{"model": ft, "parameters": {"weight": 1.0, "density": 0.3}}],
        "base_model": base, "merge_method": "dare_linear",
        "parameters": {"rescale": False}, "dtype": "float32"})
    b, f = load_state(base), load_state(ft)
    for tool in ("mk", "rm"):
        out = load_state(str(tmp_path / tool))
        kept = [out[n] != b[n] for n in b if b[n].dim() == 2]
        for n, k in zip([n for n in b if b[n].dim() == 2], kept):
            assert torch.equal(out[n][k], f[n][k])
        fraction = torch.cat([k.reshape(-1) for k in kept]).float()
        assert fraction.numel() > 8000 and abs(float(fraction.mean()) - 0.3) < 0.03, tool


def test_della_keeps_the_same_entries_statistically(mergekit_yaml, llama_family, ray_session,
                                                    tmp_path):
    """DELLA draws random masks too; what both tools must agree on is the sampling law. With
    one model, no rescale and weight 1 the output is base + mask * τ: the kept fraction of
    the smaller and larger halves of every row must be density ∓ ε/2 for both tools."""
    base, ft = llama_family["base"], llama_family["ft1"]
    _run_both(mergekit_yaml, tmp_path, {
        "models": [{"model": ft, "parameters": {"weight": 1.0, "density": 0.5,
                                                "epsilon": 0.2}}],
        "base_model": base, "merge_method": "della_linear",
        "parameters": {"rescale": False}, "dtype": "float32"})
    b, f = load_state(base), load_state(ft)
    rates = {}
    for tool in ("mk", "rm"):
        out = load_state(str(tmp_path / tool))
        low, high = [], []
        for name, tau in ((n, f[n] - b[n]) for n in b if b[n].dim() == 2):
            kept = out[name] != b[name]
            assert torch.equal(out[name][kept], f[name][kept])  # kept entries unscaled
            rank = tau.abs().argsort(dim=1).argsort(dim=1)
            half = tau.shape[1] // 2
            low.append(kept[rank < half])
            high.append(kept[rank >= tau.shape[1] - half])
        rates[tool] = (float(torch.cat(low).float().mean()),
                       float(torch.cat(high).float().mean()))
        assert sum(len(x) for x in low) > 4000  # 4480: 0.03 is 4 standard deviations
    for tool, (low, high) in rates.items():
        assert abs(low - 0.4) < 0.03 and abs(high - 0.6) < 0.03, (tool, rates)


def vocab_configs(v):
    """Vocabularies that differ: mergekit permutes embedding rows into the output tokenizer."""
    return {
        "union": {"models": [{"model": v["a"], "parameters": {"weight": 0.6}},
                             {"model": v["b"], "parameters": {"weight": 0.4}}],
                  "base_model": v["a"], "merge_method": "linear", "tokenizer_source": "union",
                  "dtype": "float32"},
        "base_permuted": {"models": [{"model": v["c"], "parameters": {"weight": 0.5}},
                                     {"model": v["a_ft"], "parameters": {"weight": 0.8}}],
                          "base_model": v["a"], "merge_method": "task_arithmetic",
                          "tokenizer_source": "base", "dtype": "float32"},
        "model_padded": {"models": [{"model": v["a_ft"], "parameters": {"weight": 1.0}},
                                    {"model": v["b"], "parameters": {"weight": 0.7}}],
                         "base_model": v["a"], "merge_method": "ties",
                         "parameters": {"density": 0.5},
                         "tokenizer": {"source": v["b"], "pad_to_multiple_of": 48},
                         "dtype": "float32"},
    }


@pytest.mark.parametrize("name", list(vocab_configs({k: k for k in ("a", "a_ft", "b", "c")})))
def test_vocabulary_merges_equal_mergekit(name, mergekit_yaml, vocab_family, ray_session,
                                          tmp_path):
    """Tokenizer union / base / another model's, with rows permuted and padded: the same
    tensors as mergekit bit for bit, the same vocabulary and vocab_size, and the output runs
    in transformers on tokens only some inputs had."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(vocab_configs(vocab_family)[name]))
    proc = subprocess.run([mergekit_yaml, str(path), str(tmp_path / "mk"), "--quiet"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # padding rows are equal copies: their magnitudes tie at TIES' trim threshold, so ask for
    # mergekit's way of breaking ties
    sort = ["merge.params.trim_ties=sort"] if name == "model_padded" else []
    assert main(["run", str(path), str(tmp_path / "rm"), "runtime.num_workers=2", *sort,
                 "--quiet"]) == 0
    theirs, ours = load_state(str(tmp_path / "mk")), load_state(str(tmp_path / "rm"))
    tok_mk = AutoTokenizer.from_pretrained(str(tmp_path / "mk"))
    tok_rm = AutoTokenizer.from_pretrained(str(tmp_path / "rm"))
    if name == "union":
        # mergekit numbers the appended tokens in hash order (different on every run); the
        # same tokens, and the same row for every token
        assert set(tok_rm.get_vocab()) == set(tok_mk.get_vocab())
        order = [tok_mk.get_vocab()[t] for t, _ in sorted(tok_rm.get_vocab().items(),
                                                           key=lambda kv: kv[1])]
        for n in ("model.embed_tokens.weight", "lm_head.weight"):
            theirs[n] = theirs[n][order]
    else:
        assert tok_rm.get_vocab() == tok_mk.get_vocab()
    assert set(theirs) == set(ours)
    differing = [n for n in theirs
                 if theirs[n].dtype != ours[n].dtype or not torch.equal(theirs[n], ours[n])]
    assert not differing, differing
    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "rm")).eval()
    assert model.config.vocab_size == ours["model.embed_tokens.weight"].shape[0] == \
        LlamaForCausalLM.from_pretrained(str(tmp_path / "mk")).config.vocab_size
    ids = tok_rm("w1 x3 w60 x7", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
