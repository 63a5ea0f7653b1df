"""The torch.compile'd decode step (lmforge.generate.compiled): the same logits as the model run without a
cache (float) or as the eager quantized decode, in one graph compiled once per decoder."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch._dynamo
from torch import nn

import lmforge
from lmforge.errors import LmforgeError
from lmforge.generate.compiled import CompiledDecoder
from lmforge.generate.kv_cache import KVCache
from lmforge.quant.quantize import quantize

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def model_of(preset: str, seed: int = 0, **changes) -> lmforge.Transformer:
    config = lmforge.ModelConfig.from_preset(preset)
    if changes:
        config = config.replace(**changes)
    torch.manual_seed(seed)
    model = lmforge.Transformer(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():  # random biases where the family has them (they start at zero)
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.5, generator=generator)
    return model


@pytest.fixture
def one_compile(monkeypatch):
    """A decoder that compiled again at some step (a new cache length, say) fails the test."""
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2", "tiny-glm4"])
def test_compiled_steps_give_the_logits_of_the_model_without_a_cache(preset, one_compile):
    model = model_of(preset)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=gen)  # two rows, one batch
    decoder = CompiledDecoder(model, 2, 16)
    with torch.no_grad():
        full = model(ids)  # [2, 12, V]: every position at once, no cache
        got = [decoder.prefill(ids[:, :5])]
        got += [decoder.step(ids[:, t]) for t in range(5, 12)]
    assert decoder.length == 12
    for i, logits in enumerate(got):
        torch.testing.assert_close(logits, full[:, 4 + i], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,act", [("int8", "bfloat16"), ("int4", "bfloat16"), ("int8", "int8")])
def test_compiled_quantized_steps_follow_the_eager_quantized_decode(method, act, one_compile):
    model = model_of("tiny-qwen2", initializer_range=0.3)  # q/k/v biases: the shared product adds them
    quantize(model, method, 32, act_dtype=act)
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, model.config.vocab_size, (1, 4), generator=gen)
    n = 10
    cache = KVCache(model.config, 1, 4 + n)
    decoder = CompiledDecoder(model, 1, 4 + n)
    with torch.inference_mode():
        eager = [cache.feed(model, prompt)[:, -1]]
        compiled = [decoder.prefill(prompt)]
        token = eager[0].argmax(-1)
        for _ in range(n - 1):  # both fed the eager decode's greedy tokens
            eager.append(cache.feed(model, token[:, None])[:, -1])
            compiled.append(decoder.step(token))
            token = eager[-1].argmax(-1)
    for e, c in zip(eager, compiled, strict=True):
        # The fused norms and casts round differently from the eager ones, and a product's input may land a
        # rounding step (bf16, or W8A8's 7-bit levels) apart; far below the logits' own scale.
        assert (e - c).abs().max() <= 0.02 * e.abs().max()
        assert e.argmax() == c.argmax()


def test_a_compiled_decoder_refuses_more_tokens_than_its_cache_holds():
    model = model_of("tiny-llama")
    with pytest.raises(LmforgeError, match="context"):
        CompiledDecoder(model, 1, model.config.max_position_embeddings + 1)
    decoder = CompiledDecoder(model, 1, 4)
    with torch.no_grad():
        decoder.prefill(torch.tensor([[1, 2, 3]]))
        with pytest.raises(LmforgeError, match="holds 4 tokens"):
            decoder.prefill(torch.tensor([[1, 2, 3, 4, 5]]))
        decoder.step(torch.tensor([4]))
        with pytest.raises(LmforgeError, match="holds 4 tokens"):
            decoder.step(torch.tensor([5]))
    decoder.reset()
    assert decoder.length == 0


def test_each_decoder_compiles_its_own_step():
    """torch.compile keeps at most 8 versions of one function and (fullgraph) fails past that: ten decoders of
    ten cache lengths must all still run compiled."""
    model = model_of("tiny-llama")
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        want = model(ids)[:, -1]
        for length in range(3, 13):
            decoder = CompiledDecoder(model, 1, length)
            decoder.prefill(ids[:, :2])
            torch.testing.assert_close(decoder.step(ids[:, 2]), want, rtol=1e-4, atol=1e-4)


def test_bench_decodes_through_the_compiled_step():
    r = subprocess.run(
        [sys.executable, "-m", "lmforge", "bench", "--model", "tiny-llama", "--compile", "--json"]
        + ["--prompt-tokens", "8", "--gen-tokens", "8", "--repeats", "1"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["compile"] is True
    assert [row["test"] for row in out["results"]] == ["pp8", "tg8"]
