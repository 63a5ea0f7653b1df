"""vLLM's tokenizer endpoints, which lm-eval's local-completions uses as its "remote" tokenizer:
POST /tokenize {"prompt" | "messages", "add_special_tokens"} -> {"tokens", "count", "max_model_len"},
POST /detokenize {"tokens"} -> {"prompt"}, GET /tokenizer_info -> the tokenizer's config (eos_token,
bos_token, chat_template, model_max_length, ...). lm-eval finds the EOS id as tokenize(eos_token)[0], so
special-token strings in a prompt become their ids (lmforge's encode does that)."""

from __future__ import annotations

from typing import Any

from lmforge.chat_formats import FORMATS
from lmforge.serve.chat import render
from lmforge.serve.errors import ApiError
from lmforge.serve.schemas import DetokenizeRequest, TokenizeRequest
from lmforge.serve.state import Loaded


def tokenize(req: TokenizeRequest, loaded: Loaded) -> dict[str, Any]:
    tok = loaded.tokenizer
    if (req.prompt is None) == (req.messages is None):
        raise ApiError(422, "give exactly one of prompt and messages.", param="prompt")
    if req.messages is not None:
        if req.add_special_tokens:
            raise ApiError(
                422, "add_special_tokens applies to a prompt; the chat format adds its own.", param="add_special_tokens"
            )
        ids = render(tok, req.messages, add_generation_prompt=req.add_generation_prompt is not False)
    else:
        add = True if req.add_special_tokens is None else req.add_special_tokens
        ids = tok.encode(req.prompt, add_special_tokens=add)
    return {"tokens": ids, "count": len(ids), "max_model_len": loaded.max_context}


def detokenize(req: DetokenizeRequest, loaded: Loaded) -> dict[str, Any]:
    bad = next((t for t in req.tokens if t >= loaded.vocab_size), None)
    if bad is not None:
        raise ApiError(422, f"token id {bad} is outside the vocabulary (0 to {loaded.vocab_size - 1}).", param="tokens")
    return {"prompt": loaded.tokenizer.decode(req.tokens)}


def _token(tok: Any, i: int | None) -> str | None:
    return tok.id_to_token(i) if i is not None else None


def tokenizer_info(loaded: Loaded) -> dict[str, Any]:
    """The tokenizer's settings in the names of HF's tokenizer_config.json, as vLLM's /tokenizer_info."""
    tok = loaded.tokenizer
    template = tok.chat_template or (FORMATS[tok.chat_format].template if tok.chat_format else None)
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": _token(tok, tok.bos_token_id),
        "eos_token": _token(tok, tok.eos_token_id),
        "pad_token": _token(tok, tok.pad_token_id),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
        "stop_token_ids": tok.stop_token_ids,
        "chat_template": template,
        "chat_format": tok.chat_format,
        "model_max_length": loaded.max_context,
        "vocab_size": tok.vocab_size,
        "add_bos_token": tok.bos_token_id is not None
        and tok.encode("a", add_special_tokens=True)[:1] == [tok.bos_token_id],
    }
