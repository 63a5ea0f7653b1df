"""Log-probabilities in the two shapes of the OpenAI API.

Completions (what lm-eval's local-completions reads): {"tokens": [str], "token_logprobs": [float | None],
"top_logprobs": [{token: logprob} | None], "text_offset": [int]}; with echo the prompt's tokens come first
and the first prompt token has no logprob (None), nothing being before it. Chat: {"content": [{"token",
"logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

NEG_INF_LOGPROB = -9999.0  # OpenAI's stand-in for log(0): JSON has no -Infinity


def finite(logprob: float | None) -> float | None:
    if logprob is None:
        return None
    return float(logprob) if logprob > NEG_INF_LOGPROB else NEG_INF_LOGPROB


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The bytes `token_id` adds to decoded text (a byte-level token may hold part of a character)."""
    try:
        pieces = tokenizer.piece_bytes()
    except Exception:  # another tokenizer, or not byte-level
        return tokenizer.decode([token_id]).encode("utf-8")
    return pieces[token_id] if 0 <= token_id < len(pieces) else b""


def token_text(tokenizer: Any, token_id: int) -> str:
    """The token as text; one that is not whole UTF-8 is written as OpenAI does, "bytes:\\xe2\\x80", so that
    distinct tokens never share a key in top_logprobs (they would all decode to U+FFFD)."""
    raw = token_bytes(tokenizer, token_id)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def text_offsets(tokenizer: Any, ids: Sequence[int], start: int = 0, skip_special_tokens: bool = False) -> list[int]:
    """Where each token's text starts in the decoded text of `ids` (plus `start`): UTF-8 safe, a token that
    ends inside a character starts where the character does."""
    try:
        stream = tokenizer.decode_stream(skip_special_tokens=skip_special_tokens)
    except Exception:  # not a byte-level BPE tokenizer: per-token texts
        stream = None
    offsets, at = [], start
    for t in ids:
        offsets.append(at)
        at += (
            len(stream.push(t))
            if stream is not None
            else len(tokenizer.decode([t], skip_special_tokens=skip_special_tokens))
        )
    return offsets


def _top(tokenizer: Any, top: dict[int, float] | None) -> dict[str, float] | None:
    if top is None:
        return None
    return {token_text(tokenizer, t): finite(lp) for t, lp in sorted(top.items(), key=lambda kv: -kv[1])}


def completion_logprobs(
    tokenizer: Any,
    ids: Sequence[int],
    logprobs: Sequence[float | None],
    tops: Sequence[dict[int, float] | None],
    offsets: Sequence[int],
) -> dict[str, Any]:
    return {
        "tokens": [token_text(tokenizer, t) for t in ids],
        "token_logprobs": [finite(lp) for lp in logprobs],
        "top_logprobs": [_top(tokenizer, top) for top in tops],
        "text_offset": list(offsets),
    }


def _entry(tokenizer: Any, token_id: int, logprob: float) -> dict[str, Any]:
    return {
        "token": token_text(tokenizer, token_id),
        "logprob": finite(logprob),
        "bytes": list(token_bytes(tokenizer, token_id)),
    }


def chat_logprobs(
    tokenizer: Any, ids: Sequence[int], logprobs: Sequence[float | None], tops: Sequence[dict[int, float] | None]
) -> dict[str, Any]:
    content = []
    for t, lp, top in zip(ids, logprobs, tops, strict=True):
        entry = _entry(tokenizer, t, lp if lp is not None else NEG_INF_LOGPROB)
        ranked = sorted((top or {}).items(), key=lambda kv: -kv[1])
        entry["top_logprobs"] = [_entry(tokenizer, a, alp) for a, alp in ranked]
        content.append(entry)
    return {"content": content, "refusal": None}
