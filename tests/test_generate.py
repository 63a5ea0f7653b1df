"""lmforge.generate against transformers' generate; batching, cache, stops, streaming, speculative, CLI."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import load_hf, make_hf_model, randomize_

import lmforge
from lmforge import LmforgeError, ModelConfig, Transformer
from lmforge.generate.api import generate, generate_stream
from lmforge.generate.kv_cache import KVCache
from lmforge.generate.speculative import speculative_generate
from lmforge.tokenizer import Tokenizer

FAMILIES = {
    "llama": {},
    "qwen2": {},
    "glm": {"pad_token_id": 0, "eos_token_id": [1, 2]},
    "glm4": {"pad_token_id": 0, "eos_token_id": [1, 2]},
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    """(lmforge model, transformers model) with the same random weights."""
    path = tmp_path_factory.mktemp(request.param)
    make_hf_model(request.param, path, **FAMILIES[request.param])
    return lmforge.load_pretrained(path), load_hf(path)


def hf_generate(model, prompt: list[int], **kw) -> list[int]:
    ids = torch.tensor([prompt])
    kw.setdefault("eos_token_id", None)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), pad_token_id=0, do_sample=False, **kw)
    return out[0, len(prompt) :].tolist()


PROMPTS = [[5, 17, 42, 9, 100, 3, 77], [250, 1, 8]]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"repetition_penalty": 1.3},
        {"no_repeat_ngram_size": 2},
        {"repetition_penalty": 0.8, "no_repeat_ngram_size": 3},
    ],
)
def test_greedy_equals_transformers(pair, options):
    ours, theirs = pair
    for prompt in PROMPTS:
        expected = hf_generate(theirs, prompt, max_new_tokens=24, **options)
        assert generate(ours, prompt, max_new_tokens=24, eos_token_id=(), **options) == expected


def test_eos_stops_like_transformers(pair):
    ours, theirs = pair
    prompt = PROMPTS[0]
    free = hf_generate(theirs, prompt, max_new_tokens=20)
    eos = [free[6], 299]  # a token the model really produces, plus one it does not
    expected = hf_generate(theirs, prompt, max_new_tokens=20, eos_token_id=eos)
    got = generate(ours, prompt, max_new_tokens=20, eos_token_id=eos)
    assert got == expected and got[-1] == free[6] and len(got) <= 7


def test_batched_equals_unbatched_and_cache_equals_recompute():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny-glm4")).eval()
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]]
    alone = [generate(model, p, max_new_tokens=12, eos_token_id=()) for p in prompts]
    assert generate(model, prompts, max_new_tokens=12, eos_token_id=()) == alone
    sampled_alone = [generate(model, p, max_new_tokens=8, do_sample=True, seed=3, eos_token_id=()) for p in prompts[:1]]
    assert generate(model, prompts[:1], max_new_tokens=8, do_sample=True, seed=3, eos_token_id=()) == sampled_alone
    # Logits from one-token steps over the cache equal a full forward over the whole sequence.
    seq = torch.tensor([prompts[0] + alone[0]])
    full = model(seq)
    cache = KVCache(model.config, 1, seq.shape[1])
    steps = [cache.feed(model, seq[:, :5])]
    steps += [cache.feed(model, seq[:, i : i + 1]) for i in range(5, seq.shape[1])]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


def test_sampling_is_reproducible_with_a_seed():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny-llama")).eval()
    kw = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_k=50, top_p=0.95, eos_token_id=())
    a = generate(model, [1, 2, 3], seed=7, **kw)
    assert a == generate(model, [1, 2, 3], seed=7, **kw)
    assert a != generate(model, [1, 2, 3], seed=8, **kw)
    several = generate(model, [1, 2, 3], seed=7, num_return_sequences=3, **kw)
    assert len(several) == 3 and len({tuple(s) for s in several}) > 1


@pytest.fixture(scope="module")
def unicode_setup():
    texts = ["naïve café 東京 タワー 🙂🙃 Ωμέγα ∑∫ " * 3 + f"line {i}" for i in range(40)]
    tok = Tokenizer.train(texts, 320, "llama3", min_frequency=1)
    config = ModelConfig.from_preset("tiny-llama").replace(vocab_size=tok.vocab_size, eos_token_id=(tok.eos_token_id,))
    torch.manual_seed(1)
    return Transformer(config).eval(), tok


def test_streaming_text_equals_final_text_with_multibyte_characters(unicode_setup):
    model, tok = unicode_setup
    for seed in range(3):
        kw = dict(max_new_tokens=40, do_sample=True, seed=seed, temperature=1.2, eos_token_id=())
        ids = generate(model, tok.encode("東京"), **kw)
        chunks = list(generate_stream(model, tok.encode("東京"), tokenizer=tok, **kw))
        assert [c.token_id for c in chunks] == ids
        assert "".join(c.text for c in chunks) == tok.decode(ids, skip_special_tokens=True)
        assert chunks[-1].finished and not any(c.finished for c in chunks[:-1])


def test_stop_strings_and_several_eos_ids(unicode_setup):
    model, tok = unicode_setup
    free = generate(model, [5, 6], max_new_tokens=30, eos_token_id=())
    text = tok.decode(free)
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if not stop.strip():
        stop = text[-2:]
    got = generate(model, [5, 6], max_new_tokens=30, eos_token_id=(), stop_strings=[stop], tokenizer=tok)
    assert stop in tok.decode(got) and stop not in tok.decode(got[:-1])
    assert got == free[: len(got)]
    eos = [free[9], free[4]]
    first = min(i for i, t in enumerate(free) if t in eos)
    assert generate(model, [5, 6], max_new_tokens=30, eos_token_id=eos) == free[: first + 1]
    with pytest.raises(LmforgeError, match="tokenizer"):
        generate(model, [5, 6], stop_strings=["x"])


@pytest.mark.parametrize(
    "bad, words",
    [
        ({"prompt": []}, "empty"),
        ({"prompt": [[1, 2], []]}, "empty"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1.0, "do_sample": True}, "temperature"),
        ({"num_beams": 2, "do_sample": True}, "beam"),
        ({"num_return_sequences": 2}, "greedy"),
        ({"top_p": 0.0}, "top_p"),
        ({"prompt": [1] * 300}, "context"),
        ({"prompt": [100000]}, "vocabulary"),
        ({"max_tokens": 3}, "max_new_tokens"),
    ],
)
def test_bad_options(bad, words):
    model = Transformer(ModelConfig.from_preset("tiny-llama"))
    kw = dict(bad)
    prompt = kw.pop("prompt", [1, 2])
    with pytest.raises(LmforgeError, match=words):
        generate(model, prompt, **kw)


def test_speculative_equals_greedy_target():
    with torch.no_grad():
        target = randomize_(Transformer(ModelConfig.from_preset("tiny-qwen2")), std=0.15).eval()
        draft = Transformer(
            ModelConfig.from_preset("tiny-qwen2").replace(num_layers=1)
        ).eval()  # a draft that mostly agrees: the target's first layer and head
        draft.embed.weight.copy_(target.embed.weight)
        draft.layers[0].load_state_dict(target.layers[0].state_dict())
        draft.norm.weight.copy_(target.norm.weight)
    prompt = [7, 8, 9, 10, 11]
    expected = generate(target, prompt, max_new_tokens=40, eos_token_id=())
    assert len(set(expected)) > 5  # a non-degenerate continuation
    for k in (1, 3, 5):
        r = speculative_generate(target, draft, prompt, 40, num_draft_tokens=k, eos_token_id=())
        assert r.tokens == expected
        # The prefill gives one token and every later target pass the accepted drafts plus its own one (the
        # last pass may overshoot max_new_tokens by one); some drafts are accepted, not all.
        assert r.accepted + r.target_forwards in (40, 41) and 0 < r.accepted < r.drafted
        assert r.acceptance_rate == r.accepted / r.drafted
    same = speculative_generate(target, target, prompt, 40, num_draft_tokens=4, eos_token_id=())
    assert same.tokens == expected and same.acceptance_rate == 1.0 and same.target_forwards == 1 + math.ceil(39 / 5)


# --- command line --------------------------------------------------------------------------------------
def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, input=stdin, env=env
    )


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, unicode_setup) -> Path:
    model, tok = unicode_setup
    path = tmp_path_factory.mktemp("chatmodel")
    lmforge.save_pretrained(model, path)
    tok.save(path)
    return path


def test_cli_generate_stream_and_json(chat_model_dir, unicode_setup):
    model, tok = unicode_setup
    out = run_cli("generate", "--model", str(chat_model_dir), "--prompt", "café", "--max-new-tokens", "12")
    assert out.returncode == 0, out.stderr
    ids = generate(model, tok.encode("café", add_special_tokens=True), max_new_tokens=12)
    assert out.stdout.rstrip("\n") == "café" + tok.decode(ids, skip_special_tokens=True)
    streamed = run_cli(
        "generate", "--model", str(chat_model_dir), "--prompt", "café", "--max-new-tokens", "12", "--stream"
    )
    assert streamed.stdout == out.stdout
    bad = run_cli("generate", "--model", str(chat_model_dir), "--prompt", "x", "--temperature", "-1", "--do-sample")
    assert bad.returncode == 2 and "temperature" in bad.stderr and "Traceback" not in bad.stderr


def test_cli_chat_session(chat_model_dir):
    out = run_cli(
        "chat",
        "--model",
        str(chat_model_dir),
        "--max-new-tokens",
        "5",
        "--system",
        "be brief",
        stdin="hello\n/reset\nagain\n/exit\nnever read\n",
    )
    assert out.returncode == 0, out.stderr
    assert "history cleared" in out.stderr
    model, tok = lmforge.load_pretrained(chat_model_dir), Tokenizer.from_pretrained(chat_model_dir)
    replies = []
    for user in ("hello", "again"):  # /reset dropped the first exchange from the second prompt
        ids = tok.apply_chat_template([{"role": "system", "content": "be brief"}, {"role": "user", "content": user}])
        new = generate(model, ids, max_new_tokens=5, eos_token_id=tok.stop_token_ids)
        replies.append(tok.decode([t for t in new if t not in tok.stop_token_ids], skip_special_tokens=True))
    assert out.stdout == "".join(r + "\n" for r in replies)


def test_cli_bench(chat_model_dir):
    out = run_cli("bench", "--model", "tiny-llama", "--prompt-tokens", "32", "--gen-tokens", "8", "--repeats", "2")
    assert out.returncode == 0, out.stderr
    assert "pp32" in out.stdout and "tg8" in out.stdout and "±" in out.stdout


def test_parallel_gemv_is_bit_identical_and_restores_the_model():
    from torch import nn

    from lmforge.generate.gemv import ParallelGemv

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1536), nn.Linear(1536, 1024, bias=False))
    threads = torch.get_num_threads()
    for rows in (1, 3, 40):
        x = torch.randn(rows, 1, 1024)
        with torch.inference_mode():
            expected = model(x)
            with ParallelGemv(model, threads=2) as ctx:
                assert len(ctx.patched) == 2 and torch.get_num_threads() == 1
                got = model(x)
        assert torch.equal(got, expected)
    assert torch.get_num_threads() == threads
    assert all("forward" not in m.__dict__ for m in model)
