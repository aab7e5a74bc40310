"""Tokenizer handling on real files, in-process: chat templates, and clear errors."""

from __future__ import annotations

import json

import pytest

from orchestrator import run_job
from orchestrator.errors import ConfigError, PlanError
from tests.conftest import tiny_llama

pytestmark = pytest.mark.integration


def job(family, out, **extra):
    return {"base": {"name": "a", "uri": family["a"]},
            "sources": [{"name": "ft", "uri": family["a_ft"]}, {"name": "c", "uri": family["c"]}],
            "merge": {"method": "task_arithmetic"}, "output": {"uri": str(out)},
            "runtime": {"executor": "local"}, **extra}


def test_chat_template_by_name_and_auto(vocab_family, tmp_path):
    """chatml writes a ChatML template into the output tokenizer and changes no tensor (the
    shuffled vocabulary of c is not permuted without a tokenizer block); the copied tokenizer
    keeps its vocabulary; auto without any input template is an error naming the key."""
    import torch
    from transformers import AutoTokenizer

    from tests.conftest import load_state

    out = run_job(job(vocab_family, tmp_path / "chat", chat_template="chatml")).output
    plain = run_job(job(vocab_family, tmp_path / "plain")).output
    merged, unchanged = load_state(out), load_state(plain)  # no row moved: c keeps its order
    assert merged.keys() == unchanged.keys()
    assert all(torch.equal(merged[n], unchanged[n]) for n in merged)
    tok = AutoTokenizer.from_pretrained(out)
    text = tok.apply_chat_template([{"role": "user", "content": "w1 w2"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nw1 w2<|im_end|>\n<|im_start|>assistant\n"
    assert tok.get_vocab() == AutoTokenizer.from_pretrained(vocab_family["a"]).get_vocab()
    with pytest.raises(ConfigError, match="chat_template: auto, but no input"):
        run_job(job(vocab_family, tmp_path / "auto", chat_template="auto"))
    with pytest.raises(ConfigError, match="neither a known template"):
        run_job(job(vocab_family, tmp_path / "bad", chat_template="chatlm"))


def test_union_records_vocab_size_and_permutes_rows_in_process(vocab_family, tmp_path):
    """The in-process executor gives the union the same vocabulary the tokenizer has; the
    config's vocab_size follows; every output token's row comes from a model that has it."""
    import torch
    from transformers import AutoTokenizer

    from tests.conftest import load_state

    doc = job(vocab_family, tmp_path / "u", tokenizer={"source": "union"})
    doc["sources"] = [{"name": "b", "uri": vocab_family["b"]}]
    doc["merge"] = {"method": "task_arithmetic", "params": {"scale": 1.0}}
    out = run_job(doc).output
    tok = AutoTokenizer.from_pretrained(out)
    config = json.loads((tmp_path / "u" / "config.json").read_text())
    assert config["vocab_size"] == len(tok.get_vocab()) == 72
    merged, b = load_state(out), load_state(vocab_family["b"])
    b_vocab = AutoTokenizer.from_pretrained(vocab_family["b"]).get_vocab()
    # task arithmetic with one model at scale 1 returns that model: x-tokens are b's rows
    for token in ("x0", "x5", "w3"):
        assert torch.allclose(merged["model.embed_tokens.weight"][tok.get_vocab()[token]],
                              b["model.embed_tokens.weight"][b_vocab[token]], atol=1e-6)


def test_missing_tokenizer_is_a_clear_error(vocab_family, tmp_path):
    bare = tiny_llama(str(tmp_path / "bare"), seed=9, base=vocab_family["a"])
    doc = job(vocab_family, tmp_path / "out", tokenizer={"source": "union"})
    doc["sources"] = [{"name": "bare", "uri": bare}]
    with pytest.raises(PlanError, match="source 'bare' .* has no tokenizer files"):
        run_job(doc)
    assert not (tmp_path / "out" / "raymerge-manifest.json").exists()
