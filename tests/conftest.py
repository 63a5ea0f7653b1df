"""Shared helpers: tiny random `transformers` models saved to disk, and input batches.

Everything here runs on CPU, offline: models are built from configs with random weights, never
downloaded from the hub.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# Never reach for the network, even by accident (from_pretrained on a local directory must stay local).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# The models are tiny: more threads than cores only adds contention (the test machines have 2 cores).
torch.set_num_threads(min(2, os.cpu_count() or 1))

VOCAB = 300
# Sizes shared by every tiny model; each test overrides what it is about.
TINY: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
# GLM's class defaults put pad_token_id (151329) and eos ids far outside a tiny vocabulary.
GLM_TOKENS: dict[str, Any] = dict(pad_token_id=0, eos_token_id=[1, 2], bos_token_id=None)
FAMILIES = ("llama", "qwen2", "glm", "glm4")


def tiny_kwargs(model_type: str, **overrides: Any) -> dict[str, Any]:
    kw = dict(TINY)
    if model_type in ("glm", "glm4"):
        kw.update(GLM_TOKENS)
    kw.update(overrides)
    return kw


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.1) -> torch.nn.Module:
    """Re-initialise every parameter so that nothing is trivially zero or one.

    Matrices, embeddings and biases get N(0, std); norm weights get 1 + N(0, std) (noise around the
    identity, so that activations keep a sensible scale while a swapped or missing norm still shows).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * std
        if "norm" in name and name.endswith("weight"):
            noise += 1.0
        p.copy_(noise.to(p.dtype))
    return model


def make_hf_model(model_type: str, path: Path | None = None, *, seed: int = 0, **config_kwargs: Any) -> torch.nn.Module:
    """A tiny random `transformers` model (SDPA attention, fp32, eval mode), saved to `path` if given."""
    import transformers
    from transformers import AutoModelForCausalLM

    cfg = transformers.CONFIG_MAPPING[model_type](**tiny_kwargs(model_type, **config_kwargs))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")
    randomize_(model, seed)
    model.eval()
    if path is not None:
        model.save_pretrained(path)
    return model


def load_hf(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """transformers' reading of a checkpoint directory (SDPA, eval mode)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=dtype).eval()


def edit_config(path: Path, fn) -> dict[str, Any]:
    """Rewrite `path/config.json` through `fn(dict) -> dict` (e.g. into the old rope_scaling style)."""
    cfg_file = Path(path) / "config.json"
    cfg = fn(json.loads(cfg_file.read_text()))
    cfg_file.write_text(json.dumps(cfg, indent=2))
    return cfg


@torch.no_grad()
def hf_logits(model: torch.nn.Module, input_ids: torch.Tensor, **kw: Any) -> torch.Tensor:
    # use_cache=False: with a cache (the default) transformers skips its packed-sequence detection, and a
    # cache-free forward is what lmforge's `model(ids)` is.
    return model(input_ids=input_ids, use_cache=False, **kw).logits


@torch.no_grad()
def our_logits(model: torch.nn.Module, input_ids: torch.Tensor, **kw: Any) -> torch.Tensor:
    return model(input_ids, **kw)


def random_ids(batch: int, length: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


@pytest.fixture
def ids() -> torch.Tensor:
    """A batch of 3 sequences of odd length."""
    return random_ids(3, 37)
