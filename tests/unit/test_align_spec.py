"""Alignment specs: a random valid permutation of every group, applied to one model, leaves
its function unchanged, for every architecture the specs know."""

import pytest
import torch
from torch import nn

from workers.align import spec as specs

G = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=4, intermediate_size=32)


def mlp():
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 10), nn.ReLU(),
                         nn.Linear(10, 3))


def llama(**extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=40, max_position_embeddings=32,
                                        num_key_value_heads=2, **{**G, **extra}))


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=40, max_position_embeddings=32,
                                        num_key_value_heads=2, **G))


def bert(classifier=True):
    from transformers import BertConfig, BertForSequenceClassification, BertModel

    cfg = BertConfig(vocab_size=40, max_position_embeddings=32, num_labels=3, **G)
    return BertForSequenceClassification(cfg) if classifier else BertModel(cfg)


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(image_size=8, patch_size=2, num_channels=1,
                                               num_labels=5, **G))


def clip_vision():
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=8, patch_size=2,
                                                          projection_dim=8, **G))


def run(model, name):
    g = torch.Generator().manual_seed(1)
    if name == "mlp":
        return model(torch.randn(5, 6, generator=g))
    if name in ("llama", "llama_tied", "qwen2", "bert", "bert_model"):
        out = model(input_ids=torch.randint(0, 40, (2, 7), generator=g))
        return out.logits if hasattr(out, "logits") else (out.last_hidden_state,
                                                          out.pooler_output)
    channels = 1 if name == "vit" else 3
    out = model(pixel_values=torch.randn(2, channels, 8, 8, generator=g))
    return out.logits if name == "vit" else out.image_embeds


MODELS = {"mlp": mlp, "llama": llama, "llama_tied": lambda: llama(tie_word_embeddings=True),
          "qwen2": qwen2, "bert": bert, "bert_model": lambda: bert(False), "vit": vit,
          "clip_vision": clip_vision}


def model_state(name):
    """A seeded tiny model of ``name``, its state dict and its alignment spec."""
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items() if v.is_floating_point()}
    config = model.config.to_dict() if hasattr(model, "config") else {}
    return model, state, specs.build(shapes, config)


@pytest.mark.parametrize("name", list(MODELS))
def test_random_permutation_of_every_group_keeps_the_function(name):
    model, state, spec = model_state(name)
    floats = [k for k, v in state.items() if v.is_floating_point()]
    perms = specs.random_permutations(spec, torch.Generator().manual_seed(2))
    assert any(not torch.equal(p, torch.arange(len(p))) for p in perms.values())
    assert all(specs.is_valid(spec.group(n), p) for n, p in perms.items())
    permuted = specs.apply(spec, perms, state)
    assert any(not torch.equal(permuted[k], state[k]) for k in floats)
    with torch.no_grad():
        want = run(model, name)
        model.load_state_dict(permuted)
        got = run(model, name)
    if name == "bert_model":  # the last hidden state is the residual stream itself: permuted
        want = (want[0][..., perms["residual"]], want[1])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_a_wrong_spec_changes_the_function():
    """The check has teeth: the attention group's dims permuted across heads (not a valid
    transform) change the outputs once attention is not uniform."""
    torch.manual_seed(0)
    model = bert().eval()
    state = model.state_dict()
    for k in state:
        if ".attention.self.query." in k or ".attention.self.key." in k:
            state[k] = state[k] * 30  # sharp attention patterns
    model.load_state_dict(state)
    spec = specs.build({k: tuple(v.shape) for k, v in state.items()
                        if v.is_floating_point()}, model.config.to_dict())
    group = spec.group("attention.0")
    across = torch.randperm(16, generator=torch.Generator().manual_seed(3))
    assert not specs.is_valid(group, across)
    with torch.no_grad():
        want = run(model, "bert")
        model.load_state_dict(specs.apply(spec, {"attention.0": across}, state))
        assert not torch.allclose(run(model, "bert"), want, rtol=1e-2, atol=0)


def test_unknown_tensors_and_wrong_sizes_are_errors():
    state = {k: tuple(v.shape) for k, v in mlp().state_dict().items()}
    spec = specs.build(state)
    assert [g.name for g in spec.groups] == ["hidden.0", "hidden.2"]
    with pytest.raises(specs.SpecError, match="does not know these tensors: extra"):
        specs.validate(spec, {**state, "extra": (3,)})
    with pytest.raises(specs.SpecError, match="should have 12 entries"):
        specs.validate(spec, {**state, "2.weight": (10, 11)})
    with pytest.raises(specs.SpecError, match="no alignment spec"):
        specs.build({"foo.bar": (2, 2)})
