"""What completions and chat completions share once their requests are submitted: the per-choice record
of events, the latency measurements, collecting a non-streamed answer, and the JSON helpers."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.streams import merged_events
from lmforge.serve.submit import Job


@dataclass
class Choice:
    """The events of one choice so far."""

    ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    tops: list[dict[int, float] | None] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, ev: Any) -> None:
        if ev.token_id is not None:
            self.ids.append(ev.token_id)
            self.logprobs.append(ev.logprob)
            self.tops.append(ev.top_logprobs)
        if ev.text:
            self.text.append(ev.text)
        if ev.finished:
            self.finish_reason = finish_reason(ev.finish_reason)


def finish_reason(reason: str | None) -> str:
    # The engine's "cancelled" only reaches a client whose request the server itself ended: vLLM says abort.
    return {"cancelled": "abort", None: "stop"}.get(reason, reason)  # type: ignore[arg-type]


class Tracker:
    """Feeds the latency histograms from the events of one API request's choices."""

    def __init__(self, metrics: ServerMetrics, n: int, start: float) -> None:
        self.metrics = metrics
        self.start = start
        self.last: list[float | None] = [None] * n

    def __call__(self, i: int, ev: Any, now: float) -> None:
        if ev.token_id is not None:
            last = self.last[i]
            if last is None:
                self.metrics.ttft.observe(now - self.start)
            else:
                self.metrics.itl.observe(now - last)
            self.last[i] = now
        if ev.finished:
            self.metrics.e2e.observe(now - self.start)
            self.metrics.finished.labels(finish_reason(ev.finish_reason)).inc()

    def cancelled(self, i: int) -> None:
        """Choice i was cancelled by the server (client gone, deadline): counted as vLLM's abort."""
        self.metrics.finished.labels("abort").inc()

    def events(self, jobs: list[Job], timeout: float | None = None) -> AsyncIterator[tuple[int, Any]]:
        return merged_events([j.handle for j in jobs], self, self.cancelled, timeout)


ENGINE_FAILED = "the engine failed while generating this request (see the server's log); restart the server."


async def collect(jobs: list[Job], tracker: Tracker) -> list[Choice]:
    """Every choice's events to the end (the non-streamed answer)."""
    from lmforge.serve.errors import ApiError

    choices = [Choice() for _ in jobs]
    async with contextlib.aclosing(tracker.events(jobs)) as events:
        async for i, ev in events:
            choices[i].add(ev)
    if any(c.finish_reason == "error" for c in choices):  # the engine thread died: no answer to give
        raise ApiError(500, ENGINE_FAILED, code="engine_failed")
    return choices


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def dumps(obj: Any) -> str:
    # Compact, and never NaN/Infinity (not JSON): logprobs are made finite before this.
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def prompt_tokens(jobs: list[Job]) -> int:
    """Prompt tokens of a request, each prompt counted once however many choices it has (as vLLM counts)."""
    return sum({j.prompt: len(j.prompt_ids) for j in jobs}.values())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def collect_or_fail(request: Any, jobs: list[Job], tracker: Tracker, timeout: float) -> list[Choice] | None:
    """collect(), cancelled when the client disconnects (None: nobody to answer) or after `timeout` (504)."""
    from lmforge.serve.errors import ApiError
    from lmforge.serve.streams import ClientGone, until_done

    try:
        return await until_done(request, collect(jobs, tracker), timeout)
    except ClientGone:
        return None
    except TimeoutError:
        raise ApiError(
            504,
            f"the request did not finish within {timeout:g} s (--request-timeout) and was cancelled.",
            code="timeout",
        ) from None


def engine_failed_event() -> dict[str, Any]:
    from lmforge.serve.errors import error_body

    return error_body(500, ENGINE_FAILED, code="engine_failed")


def timeout_event(timeout: float) -> dict[str, Any]:
    """The error a stream ends with when it runs past the deadline (openai-python raises it as APIError)."""
    from lmforge.serve.errors import error_body

    return error_body(
        504, f"the request did not finish within {timeout:g} s (--request-timeout) and was cancelled.", code="timeout"
    )
