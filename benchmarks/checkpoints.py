"""Deterministic Llama-style Hugging Face checkpoints for benchmarks: a base and K fine-tunes.

Each checkpoint is a folder with ``config.json`` (LlamaForCausalLM), sharded safetensors and
``model.safetensors.index.json``, as ``save_pretrained`` writes them. The base is seeded random
(std 0.02, norms 1); fine-tune ``i`` is ``base + 0.01 * std(base tensor) * N(0, 1)`` seeded by
``i``, so every run of the generator writes the same bytes. The layer count is chosen so that a
checkpoint holds about ``size`` bytes in ``dtype``.

    python benchmarks/checkpoints.py /tmp/bench/inputs --size 1GB --dtype bfloat16 --models 8
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from orchestrator.config.schema import parse_bytes

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_SHARD_BYTES = 400 * 2**20


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    vocab: int
    layers: int

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        h, m = self.hidden, self.intermediate
        out = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out += [(p + f"self_attn.{n}_proj.weight", (h, h)) for n in "qkvo"]
            out += [(p + "mlp.gate_proj.weight", (m, h)), (p + "mlp.up_proj.weight", (m, h)),
                    (p + "mlp.down_proj.weight", (h, m)),
                    (p + "input_layernorm.weight", (h,)),
                    (p + "post_attention_layernorm.weight", (h,))]
        return out + [("model.norm.weight", (h,)), ("lm_head.weight", (self.vocab, h))]

    def config(self, dtype: str) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "hidden_size": self.hidden, "intermediate_size": self.intermediate,
                "num_hidden_layers": self.layers, "num_attention_heads": self.hidden // 64,
                "num_key_value_heads": self.hidden // 64, "vocab_size": self.vocab,
                "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "hidden_act": "silu",
                "tie_word_embeddings": False, "torch_dtype": dtype}


def shape_for(size_bytes: int, dtype: str) -> Shape:
    """Hidden 2048 from 500 MB (Llama-1B-like), 512 from 50 MB, 128 below (smoke tests)."""
    params = size_bytes // _DTYPES[dtype].itemsize
    hidden, inter, vocab = ((2048, 5632, 32000) if size_bytes >= 500e6 else
                            (512, 1408, 8000) if size_bytes >= 50e6 else (128, 352, 1000))
    layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - 2 * vocab * hidden - hidden) / layer))
    return Shape(hidden, inter, vocab, layers)


def write_checkpoint(folder: str, shape: Shape, dtype: str, finetune: int) -> None:
    """Write checkpoint ``finetune`` (0 = base) unless a complete one is already there."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index_path):
        return
    os.makedirs(folder, exist_ok=True)
    tdtype = _DTYPES[dtype]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for n, (name, dims) in enumerate(shape.tensors()):
        t = _base_tensor(name, dims, n)
        if finetune:
            gen = torch.Generator().manual_seed(finetune * 100_003 + n)
            t = t + 0.01 * t.std() * torch.randn(dims, generator=gen)
        t = t.to(tdtype)
        if size and size + t.nbytes > _SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.nbytes
    weight_map = {}
    for i, tensors in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({name: fname for name in tensors})
    total = sum(t.nbytes for s in shards for t in s.values())
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(shape.config(dtype), f, indent=2)
    with open(index_path + ".tmp", "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    os.replace(index_path + ".tmp", index_path)  # last: marks the checkpoint complete


def _base_tensor(name: str, dims: tuple[int, ...], n: int) -> torch.Tensor:
    if len(dims) == 1:
        return torch.ones(dims)
    return 0.02 * torch.randn(dims, generator=torch.Generator().manual_seed(n))


def make_inputs(root: str, size_bytes: int, dtype: str, models: int) -> tuple[str, list[str]]:
    """Base and ``models`` fine-tunes under ``root``; returns their folders."""
    shape = shape_for(size_bytes, dtype)
    base = os.path.join(root, "base")
    write_checkpoint(base, shape, dtype, 0)
    tunes = [os.path.join(root, f"finetune-{i}") for i in range(1, models + 1)]
    for i, folder in enumerate(tunes, start=1):
        write_checkpoint(folder, shape, dtype, i)
    return base, tunes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root", help="folder for base/ and finetune-<i>/")
    ap.add_argument("--size", default="100MB", help="bytes per checkpoint, e.g. 100MB, 1GB")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES))
    ap.add_argument("--models", type=int, default=2, help="number of fine-tunes")
    args = ap.parse_args()
    base, tunes = make_inputs(args.root, parse_bytes(args.size), args.dtype, args.models)
    print("\n".join([base, *tunes]))


if __name__ == "__main__":
    main()
