"""The continuous-batching engine: paged blocks, joining and leaving, chunked prefill, prefix caching,
preemption, per-request seeds, cancellation, prompt scoring. The reference for every output is the same
request decoded alone (and, for prompt scoring, one plain forward); generate's parity with transformers,
which runs on this engine, is in test_generate.py."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from lmforge import ModelConfig, Transformer
from lmforge.errors import LmforgeError
from lmforge.generate.engine import Engine, EngineConfig, EngineFull, sequence_seed
from lmforge.generate.options import GenerationOptions
from lmforge.generate.paged import BlockManager, block_hashes
from lmforge.tokenizer import Tokenizer

GREEDY = GenerationOptions(max_new_tokens=12, eos_token_id=())


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny-llama")).eval()


def prompts(n: int, length: int = 9, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 500, (length + 3 * i,), generator=g).tolist() for i in range(n)]


def run(engine: Engine, requests, **submit) -> list[list[int]]:
    handles = [engine.submit(p, o, **submit) for p, o in requests]
    engine.run_until_done()
    return [[e.token_id for e in h if e.token_id is not None] for h in handles]


def alone(model, prompt, options, **config) -> list[int]:
    return run(Engine(model, config=EngineConfig(**config)), [(prompt, options)])[0]


# --- blocks -----------------------------------------------------------------------------------------------
def test_block_manager_counts_references_and_evicts_the_least_recently_freed():
    m = BlockManager(5, 4)  # blocks 1-4 usable, 0 is scratch
    a, b = m.allocate(), m.allocate()
    assert (a, b) == (1, 2) and m.used == 2
    m.register(a, 111)
    m.register(b, 222)
    assert m.lookup([111, 222, 333]) == [a, b] and m.refs[a] == 2  # a shared prefix is referenced twice
    m.release([a, b])
    m.release([b])
    assert m.used == 1 and m.refs[a] == 1  # b is free but still cached
    m.release([a])  # a freed after b: b is evicted first
    c, d = m.allocate(), m.allocate()  # the two never-used blocks go first
    assert {c, d} == {3, 4} and m.lookup([111]) == [a]
    m.release([a])
    assert m.allocate() == b and m.lookup([222]) == []  # b's cached contents were given away
    assert m.allocate() == a and m.allocate() is None


def test_block_hashes_chain_whole_blocks_only():
    h = block_hashes(list(range(10)), 4)
    assert len(h) == 2 and h == block_hashes(list(range(8)), 4)
    assert block_hashes([9, 1, 2, 3, 4, 5, 6, 7], 4)[1] != h[1]  # the same block after another parent


# --- batching -----------------------------------------------------------------------------------------------
def test_requests_that_join_a_running_batch_decode_as_they_would_alone(model):
    ps = prompts(4)
    expected = [alone(model, p, GREEDY) for p in ps]
    engine = Engine(model, config=EngineConfig(max_batch=4, block_size=4))
    handles = [engine.submit(ps[0], GREEDY)]
    for p in ps[1:]:  # the others arrive while the first ones are decoding
        engine.step()
        engine.step()
        handles.append(engine.submit(p, GREEDY))
    engine.run_until_done()
    got = [[e.token_id for e in h] for h in handles]
    assert got == expected
    assert engine.stats()["kv_blocks_used"] == 0 and engine.stats()["running"] == 0


def test_more_requests_than_the_batch_wait_their_turn(model):
    ps = prompts(5)
    engine = Engine(model, config=EngineConfig(max_batch=2))
    assert run(engine, [(p, GREEDY) for p in ps]) == [alone(model, p, GREEDY) for p in ps]


def test_chunked_prefill_gives_the_same_tokens_and_logprobs(model):
    p = prompts(1, length=40)[0]
    opts = GenerationOptions(max_new_tokens=6, eos_token_id=())
    whole = Engine(model, config=EngineConfig(prefill_chunk=256))
    chunked = Engine(model, config=EngineConfig(prefill_chunk=7, block_size=4))
    hw, hc = whole.submit(p, opts, logprobs=0), chunked.submit(p, opts, logprobs=0)
    whole.run_until_done()
    chunked.run_until_done()
    ew, ec = list(hw), list(hc)
    assert [e.token_id for e in ew] == [e.token_id for e in ec]
    assert [e.logprob for e in ec] == pytest.approx([e.logprob for e in ew], abs=1e-5)


def test_a_long_prompt_does_not_stall_running_streams(model):
    """With chunked prefill, a stream that is decoding gets a token every step while a long prompt is
    being computed in chunks."""
    engine = Engine(model, config=EngineConfig(prefill_chunk=8, block_size=4))
    running = engine.submit(prompts(1)[0], GenerationOptions(max_new_tokens=30, eos_token_id=()))
    engine.step()
    engine.step()
    before = running._events.qsize()
    engine.submit(prompts(1, length=200, seed=1)[0], GREEDY)  # 25 chunks of 8
    for _ in range(10):
        engine.step()
    assert running._events.qsize() - before == 10  # one token per step, prefill or not


# --- prefix caching and preemption ---------------------------------------------------------------------------
def test_a_shared_prefix_is_computed_once_and_changes_nothing(model):
    shared = prompts(1, length=40)[0]
    ps = [shared + [7, 8, 9], shared + [10, 11]]
    expected = [alone(model, p, GREEDY, prefix_caching=False) for p in ps]
    engine = Engine(model, config=EngineConfig(block_size=8))
    first = run(engine, [(ps[0], GREEDY)])
    second = run(engine, [(ps[1], GREEDY)])  # after the first finished: its blocks are cached, not held
    assert first + second == expected
    assert engine.stats()["prefix_cache_hits"] == 40  # the five whole blocks of the shared prefix
    assert engine.stats()["kv_blocks_used"] == 0


def test_preempted_requests_are_recomputed_with_the_same_output(model):
    ps = prompts(4, length=12)
    opts = GenerationOptions(max_new_tokens=20, eos_token_id=(), do_sample=True, seed=5, temperature=0.9)
    expected = [alone(model, p, opts) for p in ps]
    # 4 requests of up to 41 tokens need 12 blocks of 16 at the end; 7 makes the youngest wait and redo.
    engine = Engine(model, config=EngineConfig(max_batch=4, kv_blocks=7, block_size=16))
    assert run(engine, [(p, opts) for p in ps]) == expected
    assert engine.stats()["preemptions"] > 0 and engine.stats()["kv_blocks_used"] == 0


def test_a_request_larger_than_the_cache_is_refused(model):
    engine = Engine(model, config=EngineConfig(kv_blocks=3, block_size=4))
    with pytest.raises(LmforgeError, match="needs 4 KV blocks and the engine has 2"):
        engine.submit(list(range(1, 10)), GenerationOptions(max_new_tokens=7))
    with pytest.raises(LmforgeError, match=r"prompt \(9 tokens\) plus max_new_tokens \(250\).*256"):
        Engine(model).submit(list(range(1, 10)), GenerationOptions(max_new_tokens=250))


# --- sampling ------------------------------------------------------------------------------------------------
def test_a_seeded_request_samples_the_same_whatever_else_is_in_the_batch(model):
    ps = prompts(3)
    mine = GenerationOptions(max_new_tokens=16, do_sample=True, seed=123, top_k=50, eos_token_id=())
    expected = alone(model, ps[0], mine)
    others = [GenerationOptions(max_new_tokens=10 + i, do_sample=True, seed=i, eos_token_id=()) for i in range(2)]
    batch = run(Engine(model), [(ps[1], others[0]), (ps[0], mine), (ps[2], others[1])])
    assert batch[1] == expected
    assert alone(model, ps[0], GenerationOptions(**{**mine.__dict__, "seed": 124})) != expected
    assert sequence_seed(123, 0) == 123 and sequence_seed(123, 1) not in (123, sequence_seed(124, 1))


def test_penalties_and_per_request_logprobs(model):
    p = prompts(1)[0]
    plain = alone(model, p, GREEDY)
    engine = Engine(model)
    h = engine.submit(p, GREEDY, frequency_penalty=100.0, logprobs=3)
    engine.run_until_done()
    events = list(h)
    tokens = [e.token_id for e in events]
    assert len(set(tokens)) == len(tokens) and tokens != plain  # a huge frequency penalty forbids repeats
    for e in events:
        assert len(e.top_logprobs) == 3 and max(e.top_logprobs.values()) >= e.logprob - 1e-6


def test_one_bad_request_fails_alone(model):
    engine = Engine(model)
    bad = engine.submit(prompts(1)[0], GenerationOptions(do_sample=True, temperature=1e-300, max_new_tokens=4))
    good = engine.submit(prompts(1)[0], GREEDY)
    engine.run_until_done()
    assert [e.finish_reason for e in bad][-1] == "error" and bad.error
    assert [e.token_id for e in good] == alone(model, prompts(1)[0], GREEDY)


def test_cancel_frees_the_blocks_and_the_queue_has_a_limit(model):
    engine = Engine(model, config=EngineConfig(max_waiting=2))
    h = engine.submit(prompts(1)[0], GenerationOptions(max_new_tokens=50, eos_token_id=()))
    engine.step()
    engine.step()
    assert engine.stats()["kv_blocks_used"] > 0
    h.cancel()
    engine.run_until_done()
    assert list(h)[-1].finish_reason == "cancelled" and engine.stats()["kv_blocks_used"] == 0
    engine.submit([1, 2], GREEDY)
    engine.submit([1, 2], GREEDY)
    with pytest.raises(EngineFull):
        engine.submit([1, 2], GREEDY)


# --- prompt scoring ------------------------------------------------------------------------------------------
def test_prompt_logprobs_equal_a_plain_forward(model):
    p = prompts(1, length=30)[0]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([p]))[0].float(), -1)
    want = [float(logp[i - 1, p[i]]) for i in range(1, len(p))]
    engine = Engine(model, config=EngineConfig(prefill_chunk=8, block_size=4))
    h = engine.submit(p, GenerationOptions(max_new_tokens=1), prompt_logprobs=2)
    engine.run_until_done()
    list(h)
    assert h.prompt_logprobs[0] is None and h.prompt_logprobs[1:] == pytest.approx(want, abs=1e-5)
    assert all(len(top) == 2 for top in h.prompt_top_logprobs[1:])
    # Scoring from index 20 on reuses a cached prefix of the same tokens and gives the same numbers.
    h2 = engine.submit(p, GenerationOptions(max_new_tokens=1), prompt_logprobs=0, score_from=20)
    engine.run_until_done()
    list(h2)
    assert h2.prompt_logprobs[20:] == pytest.approx(want[19:], abs=1e-5)
    assert engine.stats()["prefix_cache_hits"] == 16  # four whole blocks before index 19


# --- text ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = [(root / n).read_text(encoding="utf-8") for n in ("textwrap.py", "string.py", "shlex.py")]
    return Tokenizer.train(texts, 400, "llama3")


def test_text_streams_without_the_stop_string(model, tokenizer):
    p = tokenizer.encode("def ", add_special_tokens=True)
    ids = alone(model, p, GenerationOptions(max_new_tokens=40, eos_token_id=()))
    text = tokenizer.decode(ids, skip_special_tokens=True)
    stop = text[10:13]  # a stop string the greedy text is known to reach
    engine = Engine(model, tokenizer)
    h = engine.submit(p, GenerationOptions(max_new_tokens=40, eos_token_id=(), stop_strings=(stop,)))
    engine.run_until_done()
    events = list(h)
    assert "".join(e.text for e in events) == text[: text.index(stop)]
    assert events[-1].finish_reason == "stop" and len(events) < 40


def test_generate_with_a_json_schema_always_parses(model, tokenizer):
    pytest.importorskip("xgrammar")
    import json

    import jsonschema

    import lmforge

    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}},
        "required": ["name", "n"],
    }
    ids = tokenizer.encode("{", add_special_tokens=True)
    outs = lmforge.generate(
        model,
        [ids, ids],
        tokenizer=tokenizer,
        json_schema=schema,
        max_new_tokens=60,
        do_sample=True,
        seed=1,
        num_return_sequences=2,
    )
    for out in outs:
        value = json.loads(tokenizer.decode(out, skip_special_tokens=True))
        jsonschema.validate(value, schema)
