"""The output tokenizer and, for each model, where each output token's embedding row comes from.

With ``tokenizer.source`` set, the output vocabulary is the base model's (``base``; the first
model without a base), one model's (its source name), or the union of all (``union``: the
base's tokens keep their ids, the others' are appended in model order, added tokens last).
Every vocabulary tensor (a tensor outside the layers whose first dimension is its model's
``vocab_size``) is then read row-permuted into that vocabulary before merging, as mergekit does:
a token a model lacks takes the row of the only model that has it, else the base's row, else the
mean of the rows of the models that have it (zero when none does); rows added by
``pad_to_multiple_of`` are the mean of the real ones.

Tokenizers are loaded with transformers from the sources' files only, never with remote code.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass

from orchestrator.config.schema import JobConfig
from orchestrator.errors import ConfigError, PlanError
from workers.io.index import CheckpointIndex
from workers.io.storage import Store

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
                   "tokenizer.model", "chat_template.jinja")
# ChatML, written out here (raymerge's own text of the well-known format)
CHAT_TEMPLATES = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
               "message['content'] + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt "
               "%}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
}


@dataclass(frozen=True)
class RowMap:
    """Rows of one input's vocabulary tensor in the output vocabulary: ``runs`` of its own rows
    ``(out_start, src_start, length)``; ``borrowed`` rows ``(out_row, ((input, src_row), ...))``
    are the mean of other inputs' rows (of the named inputs of the same item; none: zeros);
    rows from ``tokens`` to ``rows`` are the mean of the first ``tokens`` rows."""

    rows: int
    tokens: int
    runs: tuple[tuple[int, int, int], ...]
    borrowed: tuple[tuple[int, tuple[tuple[int, int], ...]], ...]


@dataclass(frozen=True)
class Vocabulary:
    files: dict[str, bytes]  # the output's tokenizer files
    rows: int  # output vocab_size (padded)
    tokens: int  # tokens in the output tokenizer
    sources: dict[int, list[int]]  # member -> per output token, its row there or -1
    vocab_sizes: dict[int, int]  # member -> its config's vocab_size

    @property
    def permutes(self) -> bool:
        """Whether vocabulary tensors are read row-permuted (a tokenizer merge)."""
        return bool(self.sources)


def build(cfg: JobConfig, indexes: list[CheckpointIndex], stores: list[Store],
          reference: int) -> Vocabulary | None:
    """The output tokenizer for ``cfg.tokenizer`` / ``cfg.chat_template`` (None: copy the
    reference's files unchanged). Members are ``cfg.sources`` then the base; ``reference`` is
    the base, else the first model. A chat template alone changes the tokenizer's files only:
    no tensor row moves (``permutes`` is false)."""
    if cfg.tokenizer is None and cfg.chat_template is None:
        return None
    members = list(range(len(indexes))) if cfg.tokenizer is not None else [reference]
    tokenizers = {m: _load(stores[m], indexes[m].name) for m in members}
    sizes = {m: _vocab_size(stores[m], indexes[m].name) or len(tokenizers[m].get_vocab())
             for m in members}
    if cfg.tokenizer is None or cfg.tokenizer.source == "base":
        out = tokenizers[reference]
    elif cfg.tokenizer.source == "union":
        out = _union([(tokenizers[m], sizes[m])
                      for m in [reference] + [m for m in members if m != reference]])
    else:
        named = [i for i, s in enumerate(cfg.sources) if s.name == cfg.tokenizer.source]
        out = tokenizers[named[0] if named else len(cfg.sources)]
    if cfg.chat_template is not None:
        out.chat_template = _chat_template(cfg.chat_template, list(tokenizers.values()))
    with tempfile.TemporaryDirectory() as tmp:
        out.save_pretrained(tmp)
        files = {}
        for name in sorted(os.listdir(tmp)):
            with open(os.path.join(tmp, name), "rb") as f:
                files[name] = f.read()
    if cfg.tokenizer is None:
        return Vocabulary(files, 0, 0, {}, {})
    vocab = out.get_vocab()
    tokens = len(vocab)
    rows = tokens
    pad = cfg.tokenizer.pad_to_multiple_of
    if pad and rows % pad:
        rows += pad - rows % pad
    sources = {}
    for m in members:
        own = tokenizers[m].get_vocab()
        table = [-1] * tokens
        for token, out_id in vocab.items():
            row = own.get(token, -1)
            table[out_id] = row if row < sizes[m] else -1
        sources[m] = table
    return Vocabulary(files, rows, tokens, sources, sizes)


def row_maps(vocab: Vocabulary, members: list[int], base: int | None) -> tuple[RowMap, ...]:
    """One RowMap per input (``members``, in item order; ``base`` among them or None)."""
    tables = [vocab.sources[m] for m in members]
    base_pos = members.index(base) if base is not None and base in members else None
    borrowed: list[list[tuple[int, tuple]]] = [[] for _ in members]
    for t in range(vocab.tokens):
        present = [i for i, table in enumerate(tables) if table[t] >= 0]
        if len(present) == len(members):
            continue
        if len(present) == 1:
            donors = ((present[0], tables[present[0]][t]),)
        elif not present:
            donors = ()
        elif base_pos is not None and base_pos in present:
            donors = ((base_pos, tables[base_pos][t]),)
        else:
            donors = tuple((i, tables[i][t]) for i in present)
        for i, table in enumerate(tables):
            if table[t] < 0:
                borrowed[i].append((t, donors))
    return tuple(RowMap(vocab.rows, vocab.tokens, _runs(table), tuple(b))
                 for table, b in zip(tables, borrowed))


def is_vocab_tensor(shape: tuple[int, ...], vocab_size: int | None) -> bool:
    return vocab_size is not None and len(shape) >= 1 and shape[0] == vocab_size


def _runs(table: list[int]) -> tuple[tuple[int, int, int], ...]:
    runs: list[list[int]] = []
    for out_id, row in enumerate(table):
        if row < 0:
            continue
        if runs and runs[-1][0] + runs[-1][2] == out_id and runs[-1][1] + runs[-1][2] == row:
            runs[-1][2] += 1
        else:
            runs.append([out_id, row, 1])
    return tuple(tuple(r) for r in runs)


def _load(store: Store, name: str):
    """The fast tokenizer of one source, from its files copied to a temporary folder."""
    from transformers import AutoTokenizer

    present = set(store.list_files())
    with tempfile.TemporaryDirectory() as tmp:
        copied = [f for f in TOKENIZER_FILES + ("config.json",) if f in present]
        if not any(f in present for f in TOKENIZER_FILES[:2] + ("vocab.txt", "vocab.json",
                                                                "tokenizer.model")):
            raise PlanError(f"source {name!r} ({store.uri}) has no tokenizer files; "
                            "tokenizer merging needs one per model")
        for f in copied:
            with open(os.path.join(tmp, f), "wb") as out:
                out.write(store.read_bytes(f))
        try:
            return AutoTokenizer.from_pretrained(tmp, use_fast=True, trust_remote_code=False)
        except Exception as e:  # transformers raises many types for unreadable tokenizers
            raise PlanError(f"source {name!r}: cannot load its tokenizer ({e})") from None


def _vocab_size(store: Store, name: str) -> int | None:
    if "config.json" not in store.list_files():
        return None
    try:
        doc = json.loads(store.read_bytes("config.json"))
    except ValueError:
        raise PlanError(f"source {name!r}: config.json is not valid JSON") from None
    value = doc.get("vocab_size", doc.get("text_config", {}).get("vocab_size"))
    return value if isinstance(value, int) else None


def _union(tokenizers: list[tuple]):
    """The first tokenizer plus every token of the others it lacks (plain tokens in model order,
    then added tokens with their settings), added the way mergekit adds them. Tokens with ids at
    or beyond their model's vocab_size (no embedding row) are left out. New tokens are taken in
    id order: mergekit takes them in the tokenizers' hash order, which changes from run to run,
    so its union ids differ between runs and from raymerge's (the rows per token agree)."""
    plain: dict[str, None] = {}
    added: dict[str, object] = {}
    for tok, size in tokenizers:
        for token, token_id in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
            if token_id < size:
                plain.setdefault(token)
        for token_id, info in sorted(tok.added_tokens_decoder.items()):
            if token_id < size:
                added.setdefault(info.content, info)
    first = tokenizers[0][0]
    out = _copy(first)
    have = first.get_vocab()
    for token in plain:
        if token not in have and token not in added:
            out.add_tokens(token)
    for info in added.values():
        out.add_tokens(info)
    return out


def _copy(tokenizer):
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return AutoTokenizer.from_pretrained(tmp, use_fast=True, trust_remote_code=False)


def _chat_template(value: str, tokenizers: list) -> str:
    if value == "auto":  # the template most of the inputs use
        found = [t.chat_template.strip() for t in tokenizers
                 if isinstance(getattr(t, "chat_template", None), str) and t.chat_template]
        if not found:
            raise ConfigError("chat_template: auto, but no input tokenizer has a chat template")
        return max(set(found), key=found.count)
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if "{" not in value:
        raise ConfigError(f"chat_template: {value!r} is neither a known template "
                          f"({', '.join(['auto', *CHAT_TEMPLATES])}) nor a Jinja template")
    return value
