"""From an API request to engine requests: prompts to ids, OpenAI's sampling fields to GenerationOptions,
one engine request per choice (n per prompt) with its own derived seed, and the limits checked before
anything is submitted (so that a refused request leaves nothing running)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.serve.errors import ApiError

DEFAULT_TEMPERATURE = 1.0  # OpenAI's default: sampling


@dataclass
class Job:
    """One engine request: one choice of one prompt."""

    index: int  # the choice's index in the response (prompt-major, as OpenAI orders them)
    prompt: int  # which prompt of the request
    prompt_ids: list[int]
    prompt_text: str | None  # the prompt string as given (echoed back), None for a token prompt
    added: int  # special tokens the server put in front (BOS), not part of prompt_text
    options: Any  # GenerationOptions
    submit_kwargs: dict[str, Any] = field(default_factory=dict)
    handle: Any = None


def refuse_unsupported(req: Any) -> None:
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported by lmforge's engine; leave it out.", param="logit_bias")
    if getattr(req, "suffix", None):
        raise ApiError(400, "suffix (insertion) is not supported; leave it out.", param="suffix")
    best_of = getattr(req, "best_of", None)
    if best_of is not None and best_of != (req.n or 1):
        raise ApiError(400, "best_of other than n is not supported (no reranking); leave it out.", param="best_of")


def generation_options(req: Any, max_new_tokens: int, eos_token_id: list[int] | None, seed: int | None) -> Any:
    """GenerationOptions for one choice of `req` (a CompletionRequest or ChatCompletionRequest)."""
    from lmforge.generate.options import GenerationOptions

    temperature = DEFAULT_TEMPERATURE if req.temperature is None else req.temperature
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": temperature > 0,
        "temperature": temperature if temperature > 0 else 1.0,
        "top_k": max(req.top_k or 0, 0),  # -1 (vLLM's off) is lmforge's 0
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "min_p": req.min_p or 0.0,
        "repetition_penalty": 1.0 if req.repetition_penalty is None else req.repetition_penalty,
        "stop_strings": tuple(stop),
        "seed": seed,
    }
    if req.ignore_eos:
        kwargs["eos_token_id"] = ()
    elif eos_token_id is not None:
        kwargs["eos_token_id"] = tuple(eos_token_id)
    try:
        return GenerationOptions(**kwargs)
    except LmforgeError as e:
        raise ApiError(422, str(e), code="invalid_value") from None


def check_context(prompt_len: int, max_tokens: int, max_context: int, what: str = "prompt") -> None:
    """400 when the prompt and the completion do not fit the model's context, saying both numbers."""
    if prompt_len + max_tokens > max_context:
        raise ApiError(
            400,
            f"This model's maximum context length is {max_context} tokens. However, you requested "
            f"{prompt_len + max_tokens} tokens ({prompt_len} in the {what}, {max_tokens} for the completion). "
            "Please reduce the length of the prompt or of max_tokens.",
            param="max_tokens" if max_tokens else "prompt",
            code="context_length_exceeded",
        )


def check_cap(max_tokens: int, cap: int, name: str = "max_tokens") -> None:
    if max_tokens > cap:
        raise ApiError(
            400,
            f"{name} is {max_tokens}, above this server's cap of {cap} (--max-tokens-cap).",
            param=name,
            code="max_tokens_exceeds_cap",
        )


def check_ids(ids: list[int], vocab_size: int) -> None:
    bad = next((t for t in ids if t >= vocab_size), None)
    if bad is not None:
        raise ApiError(422, f"token id {bad} is outside the vocabulary (0 to {vocab_size - 1}).", param="prompt")


def submit_all(engine: Any, jobs: list[Job]) -> None:
    """Submit every job (on a worker thread: submit may wait for the engine's lock). On any refusal the jobs
    already submitted are cancelled, so a request is admitted whole or not at all."""
    from lmforge.generate.engine import EngineFull

    try:
        for job in jobs:
            job.handle = engine.submit(job.prompt_ids, job.options, **job.submit_kwargs)
    except BaseException as e:
        for job in jobs:
            if job.handle is not None:
                job.handle.cancel()
        if isinstance(e, EngineFull):
            raise ApiError(
                429, f"the server is busy ({e}); retry shortly.", code="queue_full", headers={"Retry-After": "1"}
            ) from None
        if isinstance(e, LmforgeError):
            raise ApiError(400, str(e)) from None
        raise
