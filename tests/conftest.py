"""Shared fixtures: tiny real checkpoints written to tmp folders, and one local Ray per session."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

# Ray binds its services to loopback only in local-only mode, read when ray is first imported
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

LLAMA = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
             tie_word_embeddings=False)


@pytest.fixture(autouse=True)
def _log_lines():
    """raymerge's log lines on stderr at INFO, as the CLI sets them, for every test (a test's
    ``main([... "--quiet"])`` changes that only until the next test)."""
    from orchestrator.cli import configure_logging

    configure_logging(logging.INFO)


def tiny_llama(folder: str, *, seed: int = 0, base: str | None = None, scale: float = 0.05,
               dtype: torch.dtype = torch.float32, shard_size: str = "8KB", **config) -> str:
    """A tiny LlamaForCausalLM saved by transformers (sharded safetensors + index + config).

    With ``base``, the weights are the base's plus seeded deltas (a fine-tune of it);
    ``config`` overrides entries of the tiny Llama config.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**LLAMA, **config}))
    if base is not None:
        state = load_state(base)
        gen = torch.Generator().manual_seed(1000 + seed)
        model.load_state_dict({k: v + scale * torch.randn(v.shape, generator=gen) * v.std()
                               if v.numel() > 1 else v for k, v in state.items()})
    model.to(dtype).save_pretrained(folder, max_shard_size=shard_size)
    return folder


def tiny_vit_finetune(folder, noise_seed: int | None = None, head_scale: float = 0.1) -> str:
    """A tiny ViTForImageClassification from one init (seed 0); with ``noise_seed``, a
    fine-tune stand-in: seeded deltas (0.1 x N(0, 1); ``head_scale`` for the classifier)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(image_size=8, patch_size=2, num_channels=1,
                                                hidden_size=16, num_hidden_layers=2,
                                                num_attention_heads=4, intermediate_size=32,
                                                num_labels=5))
    if noise_seed is not None:
        gen = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                scale = head_scale if name.startswith("classifier") else 0.1
                p += scale * torch.randn(p.shape, generator=gen)
    model.save_pretrained(folder)
    return str(folder)


def tiny_tokenizer(folder: str, words: list[str]) -> str:
    """A word-level fast tokenizer (<unk>, <s>, </s>, then ``words``) saved into ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", *words])}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=model, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    return folder


def load_state(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, read with the safetensors library (the reference)."""
    state = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            state.update(load_file(os.path.join(folder, f)))
    return state


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory) -> dict[str, str]:
    """A base and three fine-tunes of it, fp32, each sharded over several files."""
    root = tmp_path_factory.mktemp("llama")
    base = tiny_llama(str(root / "base"), seed=0)
    family = {"base": base}
    for i in (1, 2, 3):
        family[f"ft{i}"] = tiny_llama(str(root / f"ft{i}"), seed=i, base=base)
    return family


@pytest.fixture(scope="session")
def vocab_family(tmp_path_factory) -> dict[str, str]:
    """Tiny Llamas with their own word-level tokenizers (vocab_size 64 each): ``a`` and its
    fine-tune ``a_ft`` share a vocabulary; ``b`` (another fine-tune of ``a``) has 8 words ``a``
    lacks and its rows in another order; ``c`` has the same words as ``a``, shuffled."""
    root = tmp_path_factory.mktemp("vocab")
    words = [f"w{i}" for i in range(61)]
    a = tiny_llama(str(root / "a"), seed=0)
    tiny_tokenizer(a, words)
    a_ft = tiny_tokenizer(tiny_llama(str(root / "a_ft"), seed=1, base=a), words)
    b_words = words[:53] + [f"x{i}" for i in range(8)]
    order = torch.randperm(61, generator=torch.Generator().manual_seed(3)).tolist()
    b = tiny_tokenizer(tiny_llama(str(root / "b"), seed=2, base=a),
                       [b_words[i] for i in order])
    c = tiny_tokenizer(tiny_llama(str(root / "c"), seed=4, base=a), [words[i] for i in order])
    return {"a": a, "a_ft": a_ft, "b": b, "c": c}


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session: 2 CPUs, no dashboard, bound to 127.0.0.1."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    yield ray
    ray.shutdown()


CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="session")
def s3():
    """moto in server mode on a free loopback port; the AWS chain points at it."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in [*CREDENTIALS, "AWS_ENDPOINT_URL_S3"]}
    os.environ.update(CREDENTIALS, AWS_ENDPOINT_URL_S3=f"http://{host}:{port}")
    import boto3

    client = boto3.client("s3")
    yield client
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def upload(client, bucket, folder, prefix):
    for name in os.listdir(folder):
        client.upload_file(os.path.join(folder, name), bucket, f"{prefix}/{name}")
    return f"s3://{bucket}/{prefix}"


MERGEKIT = "mergekit==0.1.5"


@pytest.fixture(scope="session")
def mergekit_yaml() -> str:
    """``mergekit-yaml`` of mergekit 0.1.5 in its own virtual environment, built on first use
    under ~/.cache/raymerge-tests (or $RAYMERGE_MERGEKIT_VENV) with this interpreter's torch,
    so that both tools do the same float arithmetic and nothing large is downloaded."""
    venv = os.environ.get("RAYMERGE_MERGEKIT_VENV") or os.path.expanduser(
        "~/.cache/raymerge-tests/mergekit-0.1.5")
    exe = os.path.join(venv, "bin", "mergekit-yaml")
    if not os.path.exists(exe):
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", venv],
                       check=True)
        torch_pin = f"torch=={torch.__version__.split('+')[0]}"
        subprocess.run([os.path.join(venv, "bin", "pip"), "install", "-q", MERGEKIT, torch_pin],
                       check=True, timeout=1200)
    return exe
