"""POST /v1/completions: one or more prompts (text or token ids), n choices each, streamed or not, with
logprobs and echo in the shape lm-eval's local-completions scores with (see logprobs.py)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmforge.generate.engine import sequence_seed
from lmforge.serve.choices import (
    Choice,
    Tracker,
    collect_or_fail,
    dumps,
    engine_failed_event,
    finish_reason,
    new_id,
    now,
    prompt_tokens,
    timeout_event,
    usage,
)
from lmforge.serve.errors import ApiError
from lmforge.serve.logprobs import completion_logprobs, text_offsets
from lmforge.serve.schemas import CompletionRequest
from lmforge.serve.state import Loaded, ServerState
from lmforge.serve.streams import SSE_DONE, EventStream, sse
from lmforge.serve.submit import (
    Job,
    check_cap,
    check_context,
    check_ids,
    generation_options,
    refuse_unsupported,
    submit_all,
)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


def encode_prompt(tokenizer: Any, text: str) -> tuple[list[int], int]:
    """(ids, how many special tokens were put in front): the tokenizer's prefix (BOS) is added unless the
    text already starts with it, as vLLM's add_special_tokens=True and lm-eval's HF backend do."""
    plain = tokenizer.encode(text)
    prefixed = tokenizer.encode(text, add_special_tokens=True)
    n = len(prefixed) - len(plain)
    if n > 0 and plain[:n] == prefixed[:n]:
        return plain, 0
    return prefixed, max(n, 0)


def _prompts(req: CompletionRequest, loaded: Loaded) -> list[tuple[list[int], str | None, int]]:
    """(ids, text as given or None, tokens added in front) of each prompt."""
    p = req.prompt
    if isinstance(p, str):
        texts: list[Any] = [p]
    elif isinstance(p[0], str):
        texts = list(p)
    elif isinstance(p[0], int):
        texts = [list(p)]
    else:
        texts = [list(x) for x in p]
    out = []
    for item in texts:
        if isinstance(item, str):
            ids, added = encode_prompt(loaded.tokenizer, item)
            out.append((ids, item, added))
        else:
            check_ids(item, loaded.vocab_size)
            out.append((item, None, 0))
        if not out[-1][0]:
            raise ApiError(400, "the prompt is empty (and the tokenizer has no BOS to start it with).", param="prompt")
    return out


def plan(req: CompletionRequest, loaded: Loaded, cap: int, max_n: int) -> tuple[list[Job], int]:
    """The engine requests for `req` (checked, not yet submitted) and the max_tokens asked for."""
    refuse_unsupported(req)
    max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
    if max_tokens == 0 and not req.echo:
        raise ApiError(
            422, "max_tokens must be at least 1 (0 only with echo, to score the prompt).", param="max_tokens"
        )
    check_cap(max_tokens, cap)
    n = req.n or 1
    if n > max_n:
        raise ApiError(400, f"n is {n}, above this server's limit of {max_n} (--max-n).", param="n")
    engine_tokens = max(max_tokens, 1)  # echo with max_tokens 0 still runs one step (the prompt's logprobs)
    echo_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
    jobs = []
    for p, (ids, text, added) in enumerate(_prompts(req, loaded)):
        check_context(len(ids), engine_tokens, loaded.max_context)
        for j in range(n):
            options = generation_options(req, engine_tokens, None, sequence_seed(req.seed, j))
            kwargs = {
                "presence_penalty": req.presence_penalty or 0.0,
                "frequency_penalty": req.frequency_penalty or 0.0,
                "logprobs": req.logprobs,
                "prompt_logprobs": echo_logprobs,
            }
            jobs.append(Job(len(jobs), p, ids, text, added, options, kwargs))
    return jobs, max_tokens


def _prompt_text(loaded: Loaded, job: Job) -> str:
    return job.prompt_text if job.prompt_text is not None else loaded.tokenizer.decode(job.prompt_ids)


def _choice_body(req: CompletionRequest, loaded: Loaded, job: Job, c: Choice, max_tokens: int) -> dict[str, Any]:
    tok = loaded.tokenizer
    gen_ids, lps, tops = (c.ids, c.logprobs, c.tops) if max_tokens > 0 else ([], [], [])
    text = "".join(c.text) if max_tokens > 0 else ""
    prefix = _prompt_text(loaded, job) if req.echo else ""
    logprobs = None
    if req.logprobs is not None:
        ids, all_lps, all_tops, offsets = list(gen_ids), list(lps), list(tops), []
        if req.echo:
            h = job.handle
            ids = job.prompt_ids + ids
            all_lps = list(h.prompt_logprobs) + all_lps
            all_tops = list(h.prompt_top_logprobs) + all_tops
            offsets = [0] * job.added + text_offsets(tok, job.prompt_ids[job.added :])
        offsets += text_offsets(tok, gen_ids, start=len(prefix), skip_special_tokens=True)
        logprobs = completion_logprobs(tok, ids, all_lps, all_tops, offsets)
    reason = "length" if max_tokens == 0 else c.finish_reason
    return {"index": job.index, "text": prefix + text, "logprobs": logprobs, "finish_reason": reason}


async def create_completion(request: Request, req: CompletionRequest, state: ServerState, metrics: Any) -> Response:
    start = time.perf_counter()
    loaded = state.require()
    cfg = state.config
    jobs, max_tokens = await run_in_threadpool(plan, req, loaded, cfg.max_tokens_cap, cfg.max_n)
    await run_in_threadpool(submit_all, loaded.engine, jobs)
    tracker = Tracker(metrics, len(jobs), start)
    rid, created = new_id("cmpl"), now()
    head = {"id": rid, "object": "text_completion", "created": created, "model": loaded.model_name}
    n_prompt = prompt_tokens(jobs)
    if req.stream:
        return EventStream(_stream(req, loaded, jobs, tracker, head, max_tokens, n_prompt, cfg.request_timeout))
    choices = await collect_or_fail(request, jobs, tracker, cfg.request_timeout)
    if choices is None:
        return Response(status_code=499)  # the client has gone: nobody reads this
    body = {
        **head,
        "choices": [_choice_body(req, loaded, j, c, max_tokens) for j, c in zip(jobs, choices, strict=True)],
        "usage": usage(n_prompt, sum(len(c.ids) for c in choices) if max_tokens > 0 else 0),
    }
    return JSONResponse(body)


async def _stream(
    req: CompletionRequest,
    loaded: Loaded,
    jobs: list[Job],
    tracker: Tracker,
    head: dict[str, Any],
    max_tokens: int,
    n_prompt: int,
    timeout: float,
) -> AsyncIterator[str]:
    tok = loaded.tokenizer
    offsets = [0] * len(jobs)  # characters streamed so far per choice (text_offset of the next token)
    started = [False] * len(jobs)
    generated = 0

    def chunk(i: int, text: str, logprobs: dict[str, Any] | None, reason: str | None) -> str:
        choice = {"index": jobs[i].index, "text": text, "logprobs": logprobs, "finish_reason": reason}
        return sse(dumps({**head, "choices": [choice]}))

    try:
        # aclosing: a hang-up closes this generator at a yield; the events' generator must close now too
        async with contextlib.aclosing(tracker.events(jobs, timeout)) as events:
            async for i, ev in events:
                if ev.finished and ev.finish_reason == "error":  # the engine thread died
                    yield sse(dumps(engine_failed_event()))
                    yield SSE_DONE
                    return
                job = jobs[i]
                if req.echo and not started[i]:
                    started[i] = True
                    prefix = _prompt_text(loaded, job)
                    lp = None
                    if req.logprobs is not None:
                        h = job.handle
                        pos = [0] * job.added + text_offsets(tok, job.prompt_ids[job.added :])
                        lp = completion_logprobs(tok, job.prompt_ids, h.prompt_logprobs, h.prompt_top_logprobs, pos)
                    yield chunk(i, prefix, lp, None)
                    offsets[i] = len(prefix)
                reason = ("length" if max_tokens == 0 else finish_reason(ev.finish_reason)) if ev.finished else None
                if max_tokens == 0:
                    if reason:
                        yield chunk(i, "", None, reason)
                    continue
                has_token = ev.token_id is not None
                generated += has_token
                lp = None
                if req.logprobs is not None and has_token:
                    lp = completion_logprobs(tok, [ev.token_id], [ev.logprob], [ev.top_logprobs], [offsets[i]])
                if ev.text or lp is not None or reason:
                    yield chunk(i, ev.text, lp, reason)
                offsets[i] += len(ev.text)
        if req.stream_options is not None and req.stream_options.include_usage:
            yield sse(dumps({**head, "choices": [], "usage": usage(n_prompt, generated)}))
    except TimeoutError:
        yield sse(dumps(timeout_event(timeout)))
    yield SSE_DONE
