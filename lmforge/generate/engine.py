"""The continuous-batching engine: requests join and leave a running batch between decode steps.

    engine = Engine(model, tokenizer, EngineConfig(max_batch=8))
    handle = engine.submit(prompt_ids, GenerationOptions(max_new_tokens=64, do_sample=True, seed=1))
    engine.start()                      # or engine.run_until_done() in the caller's thread
    for event in handle: print(event.text, end="")

Every step (vLLM's scheduler, simplified):
1. Requests whose prompt is computed decode one token each, in one forward of [B, 1].
2. The step's remaining prompt budget (`prefill_chunk` tokens) goes to prompts, oldest first, in one
   left-padded forward: a long prompt is computed over several steps (chunked prefill) so the running
   streams keep their pace. A prompt that starts with cached blocks (prefix caching) skips them.
3. Each request whose last computed token was its newest one gets a next token from its own sampling
   options, processors, constraint and generator: a request's seed gives the same text whatever else is
   in the batch, because nothing random is shared between rows.
4. When a decode step finds no free block, the youngest request is preempted: its blocks are freed and it
   waits again, to be recomputed from its prompt plus what it had generated (its sampler state is kept).

Positions and masks are made here and handed to the model, which writes keys and values where the
PagedView says (lmforge.generate.paged). Beam search and speculative decoding stay separate paths
(beam.py, speculative.py over a static KVCache): a beam forks its parent's whole cache every step and
speculative verification writes and then takes back several tokens per step, neither of which is a
request of this scheduler; both are tested token for token against transformers.

Shape letters: B rows in a forward, T tokens per row, S key slots per row, V vocab.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.generate.gemv import ParallelGemv
from lmforge.generate.options import GenerationOptions
from lmforge.generate.paged import BlockManager, PagedKVCache, block_hashes
from lmforge.generate.processors import NEG_INF, apply_processors, build_processors, sample
from lmforge.generate.structured import TokenConstraint
from lmforge.model import Transformer
from lmforge.options import option, validate

KV_MEMORY_SHARE = 0.25  # of the machine's memory, at most, for KV blocks sized automatically


_MASK64 = (1 << 64) - 1


def sequence_seed(seed: int | None, index: int) -> int | None:
    """The seed of the index-th sampled sequence of a request seeded `seed`: the request's own for the first,
    splitmix64 of (seed, index) for the others, so that each sequence is reproducible alone and the first
    equals the same request asking for one."""
    if seed is None:
        return None
    if index == 0:
        return seed % (1 << 63)
    z = (seed + index * 0x9E3779B97F4A7C15) & _MASK64  # splitmix64 (Steele et al. 2014)
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) % (1 << 63)


class EngineFull(LmforgeError):
    """The waiting queue is full; try again later (HTTP 429)."""


@dataclass(frozen=True)
class EngineConfig:
    max_batch: int = option(8, "requests in the running batch at most")
    kv_blocks: int = option(0, "KV-cache blocks (0: enough for max_batch full contexts, within a memory share)")
    block_size: int = option(16, "tokens per KV-cache block")
    prefill_chunk: int = option(256, "prompt tokens computed per engine step at most (chunked prefill)")
    max_waiting: int = option(256, "requests queued at most; more are refused")
    prefix_caching: bool = option(True, "reuse the KV blocks of prompts that share a prefix")
    kv_cache_dtype: str = option(
        "model",
        "model (the weights' dtype) or int8 (8-bit keys and values, a scale per token and head: 4x fewer bytes "
        "than fp32)",
        choices=("model", "int8"),
    )

    def __post_init__(self) -> None:
        validate(self)
        for name in ("max_batch", "block_size", "prefill_chunk", "max_waiting"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if self.kv_blocks < 0:
            raise LmforgeError(f"kv_blocks must be >= 0 (0: sized automatically), got {self.kv_blocks}.")


@dataclass
class TokenEvent:
    """One step of one request: its new token (and text), or its end."""

    token_id: int | None
    text: str
    logprob: float | None
    top_logprobs: dict[int, float] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "cancelled" | "error" (see RequestHandle.error)
    num_prompt_tokens: int
    num_generated_tokens: int


class RequestHandle:
    """The caller's side of a request: events to iterate (from any thread or an asyncio loop), cancel()."""

    def __init__(self, request_id: str) -> None:
        self.id = request_id
        self.prompt_logprobs: list[float | None] | None = None
        self.prompt_top_logprobs: list[dict[int, float] | None] | None = None
        self.finished = False
        self.error: str | None = None  # why the request ended with finish_reason "error"
        self._events: queue.Queue[TokenEvent] = queue.Queue()
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._notify: tuple[asyncio.AbstractEventLoop, asyncio.Event] | None = None

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _put(self, event: TokenEvent) -> None:
        self._events.put(event)
        with self._lock:
            notify = self._notify
        if notify is not None:
            loop, ready = notify
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is listening
                loop.call_soon_threadsafe(ready.set)

    def __iter__(self) -> Iterator[TokenEvent]:
        while True:
            event = self._events.get()
            yield event
            if event.finished:
                return

    async def aiter(self) -> AsyncIterator[TokenEvent]:
        ready = asyncio.Event()
        with self._lock:
            self._notify = (asyncio.get_running_loop(), ready)
        while True:
            ready.clear()
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                await ready.wait()
                continue
            yield event
            if event.finished:
                return


@dataclass
class _Request:
    handle: RequestHandle
    prompt: list[int]
    options: GenerationOptions
    order: int  # arrival number: the youngest (largest) is preempted first
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    score_from: int = 1  # the first prompt index whose log-prob is wanted (prefix reuse stops before it)
    constraint: TokenConstraint | None = None
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    computed: int = 0  # tokens whose keys and values are in the cache
    blocks: list[int] = field(default_factory=list)
    registered: int = 0  # leading blocks registered for prefix caching
    generator: torch.Generator | None = None
    processors: list = field(default_factory=list)
    stop_ids: frozenset[int] = frozenset()
    text: str = ""
    sent: int = 0  # characters of `text` already sent
    stream: Any = None
    scored: list = field(default_factory=list)  # (logprob, top) per prompt token from score_from on
    first_token_at: float | None = None
    score_only: bool = False  # prompt scoring only: the last prompt token is scored, never fed, nothing generated

    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.prompt)

    @property
    def end(self) -> int:
        """How many tokens the cache must hold before the request's next step (a token or its end)."""
        return len(self.tokens) - 1 if self.score_only else len(self.tokens)


class Engine:
    """Schedules requests over one model and one paged KV cache (see the module docstring)."""

    def __init__(self, model: Transformer, tokenizer: Any = None, config: EngineConfig | None = None) -> None:
        self.model, self.tokenizer = model.eval(), tokenizer
        self.config = config = config or EngineConfig()
        c = model.config
        self.max_context = c.max_position_embeddings
        self.model_name = c.source or c.family
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        blocks = config.kv_blocks or self._auto_blocks()
        self.blocks = BlockManager(blocks, config.block_size)
        int8 = config.kv_cache_dtype == "int8"
        self.cache = PagedKVCache(c, blocks, config.block_size, self.dtype, self.device, int8)
        # Decode-time matrix-vector speed-up, installed once for the engine's life: only the engine's
        # thread runs this model, so concurrent requests never race on it (lmforge.generate.gemv).
        self._gemv = ParallelGemv(model).install() if self.device.type == "cpu" else None
        self._inbox: collections.deque[_Request] = collections.deque()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: list[_Request] = []
        self._wake = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self.error: BaseException | None = None
        self.counters = collections.Counter()

    def _auto_blocks(self) -> int:
        cfg, c = self.config, self.model.config
        per_request = math.ceil(c.max_position_embeddings / cfg.block_size)
        want = cfg.max_batch * per_request + 1
        per_block = PagedKVCache.bytes_per_block(c, cfg.block_size, self.dtype, cfg.kv_cache_dtype == "int8")
        try:
            import os

            memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            memory = 8 << 30
        return max(2, min(want, int(memory * KV_MEMORY_SHARE // per_block)))

    # --- the caller's side ----------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: Sequence[int],
        options: GenerationOptions | None = None,
        *,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        score_from: int = 1,
        constraint: TokenConstraint | None = None,
        skip_special_tokens: bool = True,
        score_only: bool = False,
    ) -> RequestHandle:
        """Queue a request; its events arrive on the returned handle. Thread-safe.

        logprobs: each generated token's log-prob (and the top `logprobs` alternatives when > 0);
        prompt_logprobs: the prompt tokens' log-probs from index `score_from` on (and the top alternatives);
        constraint: structured output; skip_special_tokens: leave special tokens out of the text;
        score_only: only score the prompt (with prompt_logprobs): the request ends after its prefill, which
        feeds all but the last prompt token (so a prompt of context + 1 tokens fits), generating nothing."""
        options = options or GenerationOptions()
        prompt = [int(t) for t in prompt_ids]
        if score_only and (prompt_logprobs is None or len(prompt) < 2):
            raise LmforgeError("score_only needs prompt_logprobs and a prompt of at least 2 tokens.")
        self._check(prompt, options, score_only)
        if options.num_beams != 1 or options.num_return_sequences != 1:
            raise LmforgeError("the engine runs one sequence per request: submit n requests for n samples.")
        if options.stop_strings and self.tokenizer is None:
            raise LmforgeError("stop_strings need a tokenizer: build the engine with one.")
        with self._wake:
            if len(self._inbox) + len(self._waiting) >= self.config.max_waiting:
                raise EngineFull(f"{self.config.max_waiting} requests are already waiting; retry later.")
            number = next(self._ids)
            handle = RequestHandle(f"req-{number}")
            eos = options.eos_token_id if options.eos_token_id is not None else self.model.config.usable_eos_token_ids
            r = _Request(
                handle,
                prompt,
                options,
                order=number,
                presence_penalty=presence_penalty,
                frequency_penalty=frequency_penalty,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                score_from=max(1, min(score_from, len(prompt))),
                constraint=constraint,
                tokens=list(prompt),
                processors=build_processors(options),
                stop_ids=frozenset(eos),
                score_only=score_only,
            )
            if options.do_sample:
                r.generator = torch.Generator(self.device)
                if options.seed is not None:
                    r.generator.manual_seed(options.seed)
                else:
                    r.generator.seed()
            if self.tokenizer is not None and hasattr(self.tokenizer, "decode_stream"):
                r.stream = self.tokenizer.decode_stream(skip_special_tokens=skip_special_tokens)
            self._inbox.append(r)
            self._wake.notify()
        return handle

    def _check(self, prompt: list[int], options: GenerationOptions, score_only: bool = False) -> None:
        vocab = self.model.config.vocab_size
        if not prompt:
            raise LmforgeError("empty prompt: give at least one token (e.g. the BOS token).")
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise LmforgeError(f"the prompt has token ids outside the vocabulary [0, {vocab}): {bad[:5]}.")
        if score_only:
            if len(prompt) - 1 > self.max_context:
                raise LmforgeError(
                    f"a scored text of {len(prompt)} tokens needs {len(prompt) - 1} positions; the model's context "
                    f"is {self.max_context}."
                )
        elif len(prompt) + options.max_new_tokens > self.max_context:
            raise LmforgeError(
                f"the prompt ({len(prompt)} tokens) plus max_new_tokens ({options.max_new_tokens}) exceeds the "
                f"model's context of {self.max_context} tokens; shorten the prompt or generate less."
            )
        length = len(prompt) - 1 if score_only else len(prompt) + options.max_new_tokens
        blocks_needed = math.ceil(length / self.config.block_size)
        if blocks_needed > self.blocks.num_blocks - 1:
            raise LmforgeError(
                f"this request needs {blocks_needed} KV blocks and the engine has {self.blocks.num_blocks - 1}; "
                "raise kv_blocks or generate less."
            )

    def start(self) -> None:
        """Run the scheduling loop on a daemon thread until stop()."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="lmforge-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def run_until_done(self) -> None:
        """Step in the caller's thread until every submitted request has finished."""
        while self.has_work():
            self.step()

    def has_work(self) -> bool:
        return bool(self._inbox or self._waiting or self._running)

    def stats(self) -> dict[str, int]:
        return {
            "running": len(self._running),
            "waiting": len(self._waiting) + len(self._inbox),
            "kv_blocks_total": self.blocks.num_blocks - 1,
            "kv_blocks_used": self.blocks.used,
            **{k: self.counters[k] for k in self._COUNTERS},
        }

    _COUNTERS = (
        "prefix_cache_queries",
        "prefix_cache_hits",
        "preemptions",
        "generated_tokens",
        "prompt_tokens",
        "finished_requests",
    )

    def _loop(self) -> None:
        try:
            while True:
                with self._wake:
                    while not self._stopped and not self.has_work():
                        self._wake.wait()
                    if self._stopped:
                        return
                self.step()
        except BaseException as e:  # a bug or out-of-memory: fail every request rather than hang them
            self.error = e
            for r in [*self._running, *self._waiting, *self._inbox]:
                self._finish(r, "error")
            raise

    # --- one step --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        with self._wake:
            while self._inbox:
                self._waiting.append(self._inbox.popleft())
        self._drop_cancelled()
        decode = self._schedule_decode()
        prefill = self._schedule_prefill()
        if not decode and not prefill and self._running:
            # Every block is held by prompts that cannot grow: make room by recomputing the youngest later.
            self._preempt(max(self._running, key=lambda q: q.order))
            return
        if decode:
            self._forward(decode, [1] * len(decode), decode_step=True)
        if prefill:
            self._forward([r for r, _ in prefill], [n for _, n in prefill], decode_step=False)

    def _drop_cancelled(self) -> None:
        for r in [r for r in self._running if r.handle.cancelled]:
            self._running.remove(r)
            self._finish(r, "cancelled")
        for r in [r for r in self._waiting if r.handle.cancelled]:
            self._waiting.remove(r)
            self._finish(r, "cancelled")

    def _grow(self, r: _Request, length: int) -> bool:
        """Give `r` blocks for `length` tokens; False (nothing taken) when there are not enough."""
        need = math.ceil(length / self.config.block_size) - len(r.blocks)
        if need > self.blocks.available:
            return False
        r.blocks += [self.blocks.allocate() for _ in range(need)]  # type: ignore[misc]
        return True

    def _preempt(self, r: _Request) -> None:
        """Free `r`'s blocks and queue it first, to be recomputed (prompt + generated) later."""
        self._running.remove(r)
        self.blocks.release(r.blocks)
        r.blocks, r.computed, r.registered = [], 0, 0
        self._waiting.appendleft(r)
        self.counters["preemptions"] += 1

    def _schedule_decode(self) -> list[_Request]:
        rows = []
        ready = (r for r in self._running if not r.score_only and r.computed == len(r.tokens) - 1)
        for r in sorted(ready, key=lambda r: r.order):
            while r in self._running and not self._grow(r, r.computed + 1):
                self._preempt(max(self._running, key=lambda q: q.order))  # the youngest goes first
            if r in self._running:
                rows.append(r)
        return [r for r in rows if r in self._running]

    def _schedule_prefill(self) -> list[tuple[_Request, int]]:
        budget, out = self.config.prefill_chunk, []
        partial = sorted((r for r in self._running if r.computed < len(r.tokens) - 1), key=lambda r: r.order)
        for r in partial:
            n = min(r.end - r.computed, budget)
            if n > 0 and self._grow(r, r.computed + n):
                out.append((r, n))
                budget -= n
        while budget > 0 and self._waiting and len(self._running) < self.config.max_batch:
            r = self._waiting[0]
            self._reuse_prefix(r)
            n = min(r.end - r.computed, budget)
            if not self._grow(r, r.computed + n):
                self.blocks.release(r.blocks)  # give back the prefix blocks until there is room
                r.blocks, r.computed = [], 0
                break
            self._waiting.popleft()
            self._running.append(r)
            out.append((r, n))
            budget -= n
        return out

    def _reuse_prefix(self, r: _Request) -> None:
        """Start `r` after the longest cached run of its full blocks (at least one token is left to compute,
        and nothing the request wants scored)."""
        if not self.config.prefix_caching or r.blocks:
            return
        bs = self.config.block_size
        usable = min(len(r.tokens) - 1, r.score_from - 1 if r.prompt_logprobs is not None else len(r.tokens))
        hashes = block_hashes(r.tokens[: usable - usable % bs], bs)
        self.counters["prefix_cache_queries"] += len(r.tokens)
        found = self.blocks.lookup(hashes)
        r.blocks, r.computed, r.registered = list(found), len(found) * bs, len(found)
        self.counters["prefix_cache_hits"] += r.computed

    def _forward(self, rows: list[_Request], counts: list[int], decode_step: bool) -> None:
        """One forward over `rows`, each feeding its next `counts[i]` tokens (left-padded to the longest)."""
        bs, dev = self.config.block_size, self.device
        T = max(counts)
        S = max(r.computed + n for r, n in zip(rows, counts, strict=True))
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        pos = torch.zeros(len(rows), T, dtype=torch.long)
        write = torch.zeros(len(rows), T, dtype=torch.long)  # padding writes to scratch slot 0
        read = torch.zeros(len(rows), S, dtype=torch.long)
        ends = torch.zeros(len(rows), 1, dtype=torch.long)
        for i, (r, n) in enumerate(zip(rows, counts, strict=True)):
            end = r.computed + n
            table = torch.tensor(r.blocks, dtype=torch.long)
            p = torch.arange(end)
            slots = table[p // bs] * bs + p % bs  # [end]: slot of each position
            ids[i, T - n :] = torch.tensor(r.tokens[r.computed : end])
            pos[i, T - n :] = p[r.computed :]
            write[i, T - n :] = slots[r.computed :]
            read[i, :end] = slots
            ends[i] = end
        # Query (row, t) at position pos may see key s (= position s) when s <= pos and s < end.
        key = torch.arange(S)
        mask = (key[None, None, :] <= pos[:, :, None]) & (key[None, None, :] < ends[:, :, None])  # [B, T, S]
        real = torch.arange(T)[None, :] >= (T - torch.tensor(counts))[:, None]  # [B, T]
        mask = mask & real[:, :, None]
        mask = (mask | ~mask.any(-1, keepdim=True))[:, None]  # padding queries see everything: no NaN
        # Only the last `keep` positions go through the output projection: the one that predicts the next
        # token, or as many as the scored prompt tokens of this chunk need (rows end at the last position).
        scoring = [not decode_step and r.prompt_logprobs is not None and r.first_token_at is None for r in rows]
        keep = max(
            [1]
            + [
                min(n, max(0, r.computed + n - (r.score_from - 1)))
                for r, n, s in zip(rows, counts, scoring, strict=True)
                if s
            ]
        )
        view = self.cache.view(write.to(dev), read.to(dev))
        with self._decode_threads() if decode_step else contextlib.nullcontext():
            logits = self.model(ids.to(dev), pos.to(dev), mask.to(dev), view, logits_to_keep=keep)  # [B, keep, V]
        for i, (r, n) in enumerate(zip(rows, counts, strict=True)):
            if scoring[i]:
                m = min(n, keep)
                self._score_prompt(r, logits[i, keep - m :].float(), r.computed + n - m)
            r.computed += n
            self._register_blocks(r)
            if r.score_only and r.computed == r.end:
                self._running.remove(r)
                self._publish_scores(r)
                self._finish(r, "length")
            elif r.computed == len(r.tokens):
                try:
                    self._next_token(r, logits[i, -1].float())
                except (RuntimeError, ValueError, LmforgeError) as e:
                    # One request's bad numbers (a temperature of 1e-300 gives inf probabilities) or a
                    # grammar dead end end that request, never the engine and the others.
                    if r in self._running:
                        self._running.remove(r)
                    r.handle.error = f"{type(e).__name__}: {e}"
                    self._finish(r, "error")

    @contextlib.contextmanager
    def _decode_threads(self):
        """Decode steps run on one torch thread: their products are matrix-vector ones, which the gemv
        helpers split for large weights (gemv.py) and which MKL runs on one thread anyway; an OpenMP team
        for the small ops around them costs more than it brings, and on a busy 2-core machine decode was
        5-20x slower with two threads than with one (tests/test_serve.py's setup)."""
        if self.device.type != "cpu":
            yield
            return
        saved = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(saved)

    def _register_blocks(self, r: _Request) -> None:
        if not self.config.prefix_caching:
            return
        full = r.computed // self.config.block_size
        if full > r.registered:
            hashes = block_hashes(r.tokens[: full * self.config.block_size], self.config.block_size)
            for b in range(r.registered, full):
                self.blocks.register(r.blocks[b], hashes[b])
            r.registered = full

    def _score_prompt(self, r: _Request, logits: torch.Tensor, start: int) -> None:
        """Log-probs of prompt tokens start+1 .. start+n from this chunk's logits [n, V]: row j is the
        prediction after position start+j."""
        logp = torch.log_softmax(logits, dim=-1)  # [n, V]
        for j, row in enumerate(logp):
            t = start + 1 + j
            if t >= len(r.prompt) or t < r.score_from:
                continue
            top = None
            if r.prompt_logprobs:
                values, index = row.topk(r.prompt_logprobs)
                top = dict(zip(index.tolist(), values.tolist(), strict=True))
            r.scored.append((float(row[r.prompt[t]]), top))

    def _publish_scores(self, r: _Request) -> None:
        r.first_token_at = time.perf_counter()
        self.counters["prompt_tokens"] += len(r.prompt)
        if r.prompt_logprobs is not None:
            pad = [None] * r.score_from
            r.handle.prompt_logprobs = pad + [lp for lp, _ in r.scored]
            r.handle.prompt_top_logprobs = pad + [top for _, top in r.scored]

    def _next_token(self, r: _Request, logits: torch.Tensor) -> None:
        if r.first_token_at is None:
            self._publish_scores(r)
        scores = logits.clone()  # [V]
        if r.constraint is not None:
            allowed = r.constraint.allowed()
            if allowed is not None:
                scores = scores.masked_fill(~allowed.to(scores.device), NEG_INF)
        if r.presence_penalty or r.frequency_penalty:
            generated = torch.tensor(r.tokens[len(r.prompt) :], dtype=torch.long, device=scores.device)
            counts = torch.bincount(generated, minlength=scores.shape[-1]).to(scores.dtype)[: scores.shape[-1]]
            scores = scores - r.frequency_penalty * counts - r.presence_penalty * (counts > 0).to(scores.dtype)
        if r.processors:
            history = torch.tensor([r.tokens], dtype=torch.long, device=scores.device)
            scores = apply_processors(r.processors, history, scores[None])[0]
        if r.options.do_sample:
            token = int(sample(scores[None], r.generator)[0])
        else:
            token = int(scores.argmax())
        logprob = top = None
        if r.logprobs is not None:
            logp = torch.log_softmax(logits, dim=-1)
            logprob = float(logp[token])
            if r.logprobs > 0:
                values, index = logp.topk(r.logprobs)
                top = dict(zip(index.tolist(), values.tolist(), strict=True))
        r.tokens.append(token)
        self.counters["generated_tokens"] += 1
        if r.constraint is not None:
            r.constraint.advance(token)
        reason = None
        if token in r.stop_ids or (r.constraint is not None and r.constraint.is_finished()):
            reason = "stop"
        elif r.generated >= r.options.max_new_tokens:
            reason = "length"
        text, stopped = self._text(r, token, final=reason is not None)
        if stopped:
            reason = "stop"
        if reason is None:
            r.handle._put(self._event(r, token, text, logprob, top))
        else:
            self._running.remove(r)
            self._finish(r, reason, token, text, logprob, top)

    def _text(self, r: _Request, token: int, final: bool) -> tuple[str, bool]:
        """The new text to send after `token` and whether a stop string ended the request. Text that could
        still be the start of a stop string is held back until it cannot."""
        if r.stream is None:
            return "", False
        r.text += r.stream.push(token)
        if final:
            r.text += r.stream.flush()
        stops = r.options.stop_strings
        if stops:
            longest = max(len(s) for s in stops)
            window = max(0, r.sent - longest)
            hits = [i for i in (r.text.find(s, window) for s in stops) if i >= 0]
            if hits:
                end = min(hits)
                out = r.text[r.sent : end]
                r.sent = end
                return out, True
            safe = len(r.text) if final else max(r.sent, len(r.text) - longest + 1)
        else:
            safe = len(r.text)
        out, r.sent = r.text[r.sent : safe], safe
        return out, False

    def _event(self, r: _Request, token: int | None, text: str, logprob=None, top=None, reason=None) -> TokenEvent:
        return TokenEvent(token, text, logprob, top, reason is not None, reason, len(r.prompt), r.generated)

    def _finish(self, r: _Request, reason: str, token=None, text="", logprob=None, top=None) -> None:
        self.blocks.release(r.blocks)
        r.blocks = []
        r.handle.finished = True
        self.counters["finished_requests"] += 1
        r.handle._put(self._event(r, token, text, logprob, top, reason))

    def close(self) -> None:
        """Stop the loop and take the decode speed-up off the model."""
        self.stop()
        if self._gemv is not None:
            self._gemv.remove()
            self._gemv = None
