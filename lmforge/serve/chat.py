"""POST /v1/chat/completions: messages rendered with the model's chat format (its jinja template or
lmforge's native renderer), stopped at the format's end-of-turn tokens, with logprobs, structured output
(response_format json_object / json_schema through lmforge.generate.structured) and streaming."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lmforge.errors import LmforgeError
from lmforge.generate.engine import sequence_seed
from lmforge.serve.choices import (
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
from lmforge.serve.logprobs import chat_logprobs
from lmforge.serve.schemas import ChatCompletionRequest, Message
from lmforge.serve.state import Loaded, ServerState
from lmforge.serve.streams import SSE_DONE, EventStream, sse
from lmforge.serve.submit import (
    Job,
    check_cap,
    check_context,
    generation_options,
    refuse_unsupported,
    submit_all,
)


def as_dicts(messages: list[Message]) -> list[dict[str, str]]:
    """OpenAI messages as lmforge's {'role', 'content'} dicts: text parts joined, `developer` as `system`."""
    out = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content or [])
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def render(tokenizer: Any, messages: list[Message], add_generation_prompt: bool = True) -> list[int]:
    try:
        return tokenizer.apply_chat_template(as_dicts(messages), add_generation_prompt=add_generation_prompt)
    except LmforgeError as e:
        raise ApiError(
            400, f"cannot render the messages with this model's chat format: {e}", param="messages"
        ) from None


def _constraint_factory(req: ChatCompletionRequest, loaded: Loaded) -> Any:
    """A function making a fresh constraint per choice (they are stateful), or None for free text."""
    fmt = req.response_format
    if fmt is None or fmt.type == "text":
        return None
    try:
        from lmforge.generate.structured import build_constraint
    except ImportError:
        raise ApiError(
            400, "structured output (response_format) is not available in this build.", param="response_format"
        ) from None
    schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None

    def make() -> Any:
        try:
            return build_constraint(loaded.tokenizer, loaded.vocab_size, json_schema=schema, json_object=schema is None)
        except LmforgeError as e:
            raise ApiError(400, f"response_format: {e}", param="response_format") from None

    return make


def plan(req: ChatCompletionRequest, loaded: Loaded, cap: int, max_n: int) -> tuple[list[Job], int]:
    refuse_unsupported(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(422, "top_logprobs needs logprobs: true.", param="top_logprobs")
    if (
        req.max_tokens is not None
        and req.max_completion_tokens is not None
        and req.max_tokens != req.max_completion_tokens
    ):
        raise ApiError(422, "max_tokens and max_completion_tokens differ; give one of them.", param="max_tokens")
    n = req.n or 1
    if n > max_n:
        raise ApiError(400, f"n is {n}, above this server's limit of {max_n} (--max-n).", param="n")
    ids = render(loaded.tokenizer, req.messages)
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if asked is None:  # what the context leaves, up to the cap (vLLM's default)
        room = loaded.max_context - len(ids)
        if room < 1:
            check_context(len(ids), 1, loaded.max_context, what="messages")
        max_tokens = min(cap, room)
    else:
        check_cap(asked, cap)
        max_tokens = asked
    check_context(len(ids), max_tokens, loaded.max_context, what="messages")
    make_constraint = _constraint_factory(req, loaded)
    stop_ids = loaded.tokenizer.stop_token_ids or None
    jobs = []
    for j in range(n):
        options = generation_options(req, max_tokens, stop_ids, sequence_seed(req.seed, j))
        kwargs: dict[str, Any] = {
            "presence_penalty": req.presence_penalty or 0.0,
            "frequency_penalty": req.frequency_penalty or 0.0,
            "logprobs": (req.top_logprobs or 0) if req.logprobs else None,
        }
        if make_constraint is not None:
            kwargs["constraint"] = make_constraint()
        jobs.append(Job(j, 0, ids, None, 0, options, kwargs))
    return jobs, max_tokens


async def create_chat_completion(
    request: Request, req: ChatCompletionRequest, state: ServerState, metrics: Any
) -> Response:
    start = time.perf_counter()
    loaded = state.require()
    cfg = state.config
    jobs, _ = await run_in_threadpool(plan, req, loaded, cfg.max_tokens_cap, cfg.max_n)
    await run_in_threadpool(submit_all, loaded.engine, jobs)
    tracker = Tracker(metrics, len(jobs), start)
    head = {"id": new_id("chatcmpl"), "created": now(), "model": loaded.model_name}
    if req.stream:
        return EventStream(_stream(req, loaded, jobs, tracker, head, cfg.request_timeout))
    choices = await collect_or_fail(request, jobs, tracker, cfg.request_timeout)
    if choices is None:
        return Response(status_code=499)
    body = {
        **head,
        "object": "chat.completion",
        "choices": [
            {
                "index": j.index,
                "message": {"role": "assistant", "content": "".join(c.text)},
                "logprobs": chat_logprobs(loaded.tokenizer, c.ids, c.logprobs, c.tops) if req.logprobs else None,
                "finish_reason": c.finish_reason,
            }
            for j, c in zip(jobs, choices, strict=True)
        ],
        "usage": usage(prompt_tokens(jobs), sum(len(c.ids) for c in choices)),
    }
    return JSONResponse(body)


async def _stream(
    req: ChatCompletionRequest, loaded: Loaded, jobs: list[Job], tracker: Tracker, head: dict[str, Any], timeout: float
) -> AsyncIterator[str]:
    head = {**head, "object": "chat.completion.chunk"}
    generated = 0

    def chunk(i: int, delta: dict[str, Any], logprobs: dict[str, Any] | None, reason: str | None) -> str:
        choice = {"index": jobs[i].index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return sse(dumps({**head, "choices": [choice]}))

    try:
        for i in range(len(jobs)):  # the role first, as OpenAI streams it
            yield chunk(i, {"role": "assistant", "content": ""}, None, None)
        # aclosing: a hang-up closes this generator at a yield; the events' generator must close now too
        async with contextlib.aclosing(tracker.events(jobs, timeout)) as events:
            async for i, ev in events:
                if ev.finished and ev.finish_reason == "error":  # the engine thread died
                    yield sse(dumps(engine_failed_event()))
                    yield SSE_DONE
                    return
                reason = finish_reason(ev.finish_reason) if ev.finished else None
                has_token = ev.token_id is not None
                generated += has_token
                lp = None
                if req.logprobs and has_token:
                    lp = chat_logprobs(loaded.tokenizer, [ev.token_id], [ev.logprob], [ev.top_logprobs])
                if ev.text or lp is not None or reason:
                    yield chunk(i, {"content": ev.text} if ev.text or not reason else {}, lp, reason)
        if req.stream_options is not None and req.stream_options.include_usage:
            yield sse(dumps({**head, "choices": [], "usage": usage(prompt_tokens(jobs), generated)}))
    except TimeoutError:
        yield sse(dumps(timeout_event(timeout)))
    yield SSE_DONE
