"""Blank infilling with a model trained with GLM's objective (lmforge.train.glm, docs/glm.md).

    infill(model, tokenizer, "the cat [MASK] on the mat")        -> "the cat sat on the mat"
    infill_ids(model, part_a_ids, GlmTokens.from_tokenizer(tok)) -> [[ids of blank 1], [ids of blank 2], ...]

Decoding follows the training layout exactly: Part A (the text with its blanks) is encoded once with
bidirectional attention into the KV cache, at positions (i, 0). Then, blank after blank from left to right,
`<sop>` is fed at position (blank's index, 1) and the span is generated one token at a time with position #2
counting up, until `<eop>` (which is not fed back, as [END] is never an input in training) or the limit.
The cache keeps each span (`<sop> s1..sl`), so later blanks attend to the earlier filled spans, as Part B
attends causally to earlier spans in training. [MASK], [sMASK] and [gMASK] are all blanks; which one the
model was trained on for which kind of span is in docs/glm.md.

Shape letters: A Part A length, V vocab.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.generate.kv_cache import KVCache
from lmforge.generate.options import GenerationOptions
from lmforge.generate.processors import apply_processors, build_processors, sample
from lmforge.model import Transformer
from lmforge.train.glm import GlmTokens

BLANK_PATTERN = re.compile(r"(\[MASK\]|\[sMASK\]|\[gMASK\])")


def _check_options(opts: GenerationOptions) -> None:
    if opts.num_beams != 1 or opts.num_return_sequences != 1:
        raise LmforgeError("infilling fills each blank once: use num_beams=1 and num_return_sequences=1.")
    if opts.stop_strings:
        raise LmforgeError("infilling stops each blank at <eop> (or max_new_tokens); stop_strings are not supported.")


@torch.inference_mode()
def infill_ids(
    model: Transformer, part_a: Sequence[int], glm: GlmTokens, *, max_new_tokens: int = 32, **options: Any
) -> list[list[int]]:
    """The generated token ids of every blank of `part_a` (token ids holding [MASK]/[sMASK]/[gMASK]), in
    order; at most `max_new_tokens` per blank, the stop token (<eop>, the model's eos ids or the given
    eos_token_id) left out. Other options as in `lmforge.generate` (greedy by default; do_sample,
    temperature, top_k, top_p, repetition_penalty, seed, ...)."""
    opts = GenerationOptions.from_kwargs(max_new_tokens=max_new_tokens, **options)
    _check_options(opts)
    ids = [int(t) for t in part_a]
    blanks = [i for i, t in enumerate(ids) if t in glm.blanks]
    if not blanks:
        raise LmforgeError("the text has no [MASK], [sMASK] or [gMASK] to fill.")
    c = model.config
    bad = [t for t in ids if not 0 <= t < c.vocab_size]
    if bad:
        raise LmforgeError(f"token ids outside the vocabulary [0, {c.vocab_size}): {bad[:5]}.")
    a = len(ids)
    if max(a, opts.max_new_tokens + 1) > c.max_position_embeddings:
        raise LmforgeError(
            f"the text ({a} tokens) or max_new_tokens + 1 ({opts.max_new_tokens + 1}) exceeds the model's context of "
            f"{c.max_position_embeddings} positions; shorten the text or generate less."
        )
    stop = {glm.eop, *c.usable_eos_token_ids, *(opts.eos_token_id or ())}
    processors = build_processors(opts)
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    generator = torch.Generator(device).manual_seed(opts.seed) if opts.seed is not None else None
    was_training = model.training
    model.eval()
    try:
        cache = KVCache(c, 1, a + len(blanks) * (opts.max_new_tokens + 1), dtype, device)
        # Part A: positions (i, 0), every token sees every other one.
        positions = torch.stack([torch.arange(a), torch.zeros(a, dtype=torch.long)], dim=-1)[None]  # [1, A, 2]
        everything = torch.ones(1, 1, a, a, dtype=torch.bool, device=device)
        model(torch.tensor([ids], device=device), positions.to(device), everything, cache, logits_to_keep=1)
        history = list(ids)
        spans: list[list[int]] = []
        for blank in blanks:
            token, span = glm.sop, []
            for step in range(opts.max_new_tokens):
                # One new token attends to every cached slot: Part A, earlier spans, this span so far.
                position = torch.tensor([[[blank, step + 1]]], device=device)  # [1, 1, 2]
                logits = model(torch.tensor([[token]], device=device), position, cache=cache)[:, -1].float()  # [1, V]
                history.append(token)
                if processors:
                    logits = apply_processors(processors, torch.tensor([history], device=device), logits)
                nxt = int((sample(logits, generator) if opts.do_sample else logits.argmax(-1))[0])
                if nxt in stop:
                    break
                span.append(nxt)
                token = nxt
            spans.append(span)
    finally:
        model.train(was_training)
    return spans


def _part_a(tokenizer: Any, text: str, glm: GlmTokens) -> tuple[list[int], list[str], list[bool]]:
    """Part A's ids, the text pieces around the blanks, and for each blank whether one space before it
    was taken off. A word's leading space belongs to the word's token in byte-level BPE, so in training a
    blank follows the previous word directly and the span's first token carries the space; `cat [MASK]`
    is therefore encoded as `cat[MASK]`, and the space comes back with the filled text."""
    parts = BLANK_PATTERN.split(text)
    pieces, markers = parts[0::2], parts[1::2]
    if not markers:
        raise LmforgeError(f"the text has no [MASK], [sMASK] or [gMASK] to fill: {text!r}.")
    blank_id = {"[MASK]": glm.mask, "[sMASK]": glm.smask, "[gMASK]": glm.gmask}
    ids: list[int] = []
    spaced: list[bool] = []
    for i, marker in enumerate(markers):
        piece = pieces[i]
        spaced.append(piece.endswith(" "))
        if spaced[-1]:
            piece = pieces[i] = piece[:-1]
        ids += tokenizer.encode(piece) + [blank_id[marker]]
    ids += tokenizer.encode(pieces[-1])
    return ids, pieces, spaced


def infill_with_spans(
    model: Transformer, tokenizer: Any, text_with_masks: str, *, max_new_tokens: int = 32, **options: Any
) -> tuple[str, list[list[int]]]:
    """`infill`, also returning the generated ids of each blank."""
    glm = GlmTokens.from_tokenizer(tokenizer)
    ids, pieces, spaced = _part_a(tokenizer, text_with_masks, glm)
    spans = infill_ids(model, ids, glm, max_new_tokens=max_new_tokens, **options)
    out = []
    for piece, span, space in zip(pieces, spans, spaced, strict=False):
        fill = tokenizer.decode(span, skip_special_tokens=True)
        if space and not fill[:1].isspace():
            fill = " " + fill
        out += [piece, fill]
    out.append(pieces[-1])
    return "".join(out), spans


def infill(model: Transformer, tokenizer: Any, text_with_masks: str, max_new_tokens: int = 32, **options: Any) -> str:
    """`text_with_masks` with every [MASK] / [sMASK] / [gMASK] replaced by the model's span, in order.

    The model must have been trained with the GLM objective (`lmforge pretrain --objective glm`) and the
    tokenizer must have GLM's special tokens (chat format glm4). At most `max_new_tokens` per blank; the
    other options are those of `lmforge.generate` (greedy unless do_sample=True). A space right before a
    blank is given back in front of its filled text."""
    return infill_with_spans(model, tokenizer, text_with_masks, max_new_tokens=max_new_tokens, **options)[0]
