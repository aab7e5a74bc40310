"""Model families without per-family code: tiny random Mistral, Qwen2, Gemma, Phi, GPT-2, BERT,
ViT and CLIP checkpoints (built by transformers from configs, nothing downloaded) are merged
whole with a layer gradient and stacked by slices; the outputs load and run in transformers."""

from __future__ import annotations

import json

import pytest
import torch

from orchestrator import run_job
from orchestrator.errors import PlanError
from tests.conftest import load_state

pytestmark = pytest.mark.integration

DECODER = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
FAMILIES = {
    "mistral": ("MistralConfig", "MistralForCausalLM", DECODER),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", DECODER),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {**DECODER, "head_dim": 4}),
    "phi": ("PhiConfig", "PhiForCausalLM", {**DECODER, "num_key_value_heads": 4}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel",
             dict(vocab_size=64, n_embd=16, n_layer=3, n_head=4, n_positions=32)),
    "bert": ("BertConfig", "BertForMaskedLM",
             dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=32)),
    "vit": ("ViTConfig", "ViTForImageClassification",
            dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                 num_hidden_layers=3, num_attention_heads=4, num_labels=5)),
}


def build(family, folder, seed):
    import transformers

    config_cls, model_cls, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs))
    model.save_pretrained(folder)
    return model_cls


def forward(model_cls, folder):
    import transformers

    model = getattr(transformers, model_cls).from_pretrained(folder).eval()
    with torch.no_grad():
        if model_cls.startswith("ViT"):
            out = model(pixel_values=torch.randn(1, 3, 16, 16)).logits
        else:
            out = model(input_ids=torch.tensor([[1, 5, 9, 3]])).logits
    assert torch.isfinite(out).all()
    return model


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_merges_and_stacks_without_declarations(family, tmp_path):
    model_cls = build(family, str(tmp_path / "a"), 0)
    build(family, str(tmp_path / "b"), 1)
    sources = [{"name": "a", "uri": str(tmp_path / "a")}, {"name": "b", "uri": str(tmp_path / "b")}]
    # a gradient over the layers: weight of b goes 0 -> 1 from the first layer to the last
    run_job({"sources": sources, "merge": {"method": "slerp", "params": {"t": [0.0, 1.0]}},
             "output": {"uri": str(tmp_path / "grad")}, "runtime": {"executor": "local"}})
    forward(model_cls, str(tmp_path / "grad"))
    a, b, grad = (load_state(str(tmp_path / n)) for n in ("a", "b", "grad"))
    first = [n for n in a if ".0." in n and a[n].dim() == 2][0]
    last = first.replace(".0.", ".2.", 1)
    assert torch.equal(grad[first], a[first]) and torch.equal(grad[last], b[last])

    run_job({"sources": sources,
             "slices": [{"sources": [{"source": "a", "layers": [0, 2]}]},
                        {"sources": [{"source": "b", "layers": [1, 3]}]}],
             "merge": {"method": "passthrough"}, "output": {"uri": str(tmp_path / "stack")},
             "runtime": {"executor": "local"}})
    model = forward(model_cls, str(tmp_path / "stack"))
    config = json.loads((tmp_path / "stack" / "config.json").read_text())
    assert config.get("num_hidden_layers", config.get("n_layer")) == 4
    stack = load_state(str(tmp_path / "stack"))
    assert torch.equal(stack[first.replace(".0.", ".3.", 1)], b[first.replace(".0.", ".2.", 1)])
    assert sum(p.numel() for p in model.parameters()) > 0


def test_clip_has_two_stacks_and_says_so(tmp_path):
    """CLIP merges whole; slicing it without naming the stack is refused with the stacks
    found, and a name that is not a stack is refused too."""
    import transformers

    cfg = transformers.CLIPConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16),
        vision_config=dict(image_size=16, patch_size=8, hidden_size=16, intermediate_size=32,
                           num_hidden_layers=2, num_attention_heads=4),
        projection_dim=8)
    for seed, name in ((0, "a"), (1, "b")):
        torch.manual_seed(seed)
        transformers.CLIPModel(cfg).save_pretrained(str(tmp_path / name))
    sources = [{"name": "a", "uri": str(tmp_path / "a")}, {"name": "b", "uri": str(tmp_path / "b")}]
    run_job({"sources": sources, "merge": {"method": "linear"},
             "output": {"uri": str(tmp_path / "out")}, "runtime": {"executor": "local"}})
    transformers.CLIPModel.from_pretrained(str(tmp_path / "out"))
    doc = {"sources": sources, "slices": [{"sources": [{"source": "a", "layers": [0, 2]}]}],
           "merge": {"method": "passthrough"}, "output": {"uri": str(tmp_path / "s")},
           "runtime": {"executor": "local"}}
    with pytest.raises(PlanError, match="cannot tell which stack.*text_model.encoder.layers."):
        run_job(doc)
    with pytest.raises(PlanError, match="layout.layers: 'encoder.layers.' is not a stack"):
        run_job({**doc, "layout": {"layers": "encoder.layers."}})
