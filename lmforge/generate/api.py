"""`lmforge.generate` and `lmforge.generate_stream`: the public decoding entry points.

    generate(model, [1, 2, 3], max_new_tokens=20)                   -> [ids...]  (new tokens only)
    generate(model, [[1, 2], [3, 4, 5]], do_sample=True, seed=0)     -> [[...], [...]]
    for chunk in generate_stream(model, ids, tokenizer=tok): print(chunk.text, end="")

A row stops at its first EOS (kept in the output, as transformers does) or once its decoded text contains
one of `stop_strings`; the batch stops when every row has.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.generate.engine import Engine, EngineConfig, RequestHandle, sequence_seed
from lmforge.generate.options import GenerationOptions
from lmforge.generate.processors import build_processors
from lmforge.model import Transformer


@dataclass
class Chunk:
    """One streamed step: the new token of the (single) prompt and, with a tokenizer, its new text."""

    token_id: int
    text: str = ""
    finished: bool = False


def _normalize_prompts(prompt_ids: Any) -> tuple[list[list[int]], bool]:
    """(prompts, single): accept one prompt (a list of ints) or a batch (a list of lists)."""
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.tolist()
    if not isinstance(prompt_ids, (list, tuple)) or len(prompt_ids) == 0:
        raise LmforgeError("prompt_ids must be a non-empty list of token ids, or a list of such lists.")
    if all(isinstance(t, int) for t in prompt_ids):
        return [list(prompt_ids)], True
    if all(isinstance(p, (list, tuple)) and all(isinstance(t, int) for t in p) for p in prompt_ids):
        return [list(p) for p in prompt_ids], False
    raise LmforgeError("prompt_ids must be a list of ints (one prompt) or a list of lists of ints (a batch).")


def _check_prompts(model: Transformer, prompts: list[list[int]], options: GenerationOptions) -> None:
    vocab = model.config.vocab_size
    for i, p in enumerate(prompts):
        if not p:
            raise LmforgeError(f"prompt {i} is empty: give at least one token (e.g. the BOS token).")
        bad = [t for t in p if not 0 <= t < vocab]
        if bad:
            raise LmforgeError(f"prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}.")
    longest = max(len(p) for p in prompts)
    if longest + options.max_new_tokens > model.config.max_position_embeddings:
        raise LmforgeError(
            f"the prompt ({longest} tokens) plus max_new_tokens ({options.max_new_tokens}) exceeds the model's "
            f"context of {model.config.max_position_embeddings} tokens; shorten the prompt or generate less."
        )


def _engine_run(
    model: Transformer,
    prompts: list[list[int]],
    options: GenerationOptions,
    tokenizer: Any,
    skip_special_tokens: bool = True,
    grammar: Any = None,
) -> tuple[Engine, list[RequestHandle]]:
    """An engine sized for exactly these rows (prompts x num_return_sequences, no preemption), with every
    row submitted; the caller steps it."""
    if options.stop_strings and tokenizer is None:
        raise LmforgeError("stop_strings need a tokenizer: pass tokenizer=... to decode the generated text.")
    rows = [(p, j) for p in prompts for j in range(options.num_return_sequences)]
    block = 16
    blocks = sum(math.ceil((len(p) + options.max_new_tokens) / block) for p, _ in rows) + 1
    config = EngineConfig(
        max_batch=len(rows),
        kv_blocks=blocks,
        block_size=block,
        prefill_chunk=max(256, sum(len(p) for p, _ in rows)),
        max_waiting=len(rows),
    )
    engine = Engine(model, tokenizer, config)
    one = dataclasses.replace(options, num_return_sequences=1)
    handles = [
        engine.submit(
            p,
            dataclasses.replace(one, seed=sequence_seed(options.seed, j)),
            skip_special_tokens=skip_special_tokens,
            constraint=grammar.constraint() if grammar is not None else None,
        )
        for p, j in rows
    ]
    return engine, handles


def generate(
    model: Transformer,
    prompt_ids: Any,
    *,
    tokenizer: Any = None,
    json_schema: dict | str | None = None,
    regex: str | None = None,
    json_object: bool = False,
    **options: Any,
) -> list:
    """Generated token ids (without the prompt) for one prompt or a batch; options as GenerationOptions.

    One prompt -> list[int]; a batch -> list[list[int]]; with num_return_sequences = n > 1, n lists per
    prompt (prompt-major, as transformers orders them). `json_schema`, `regex` or `json_object` constrain
    the output to that grammar (lmforge.generate.structured; needs the tokenizer and the `structured`
    extra): the text always parses, and ends where the grammar is complete.
    """
    opts = GenerationOptions.from_kwargs(**options)
    grammar = None
    if json_schema is not None or regex is not None or json_object:
        if tokenizer is None:
            raise LmforgeError("structured output needs the tokenizer: pass tokenizer=...")
        if opts.num_beams > 1:
            raise LmforgeError("structured output decodes with sampling or greedy search, not beams.")
        from lmforge.generate.structured import compile_grammar

        grammar = compile_grammar(
            tokenizer, model.config.vocab_size, json_schema=json_schema, regex=regex, json_object=json_object
        )
    prompts, single = _normalize_prompts(prompt_ids)
    _check_prompts(model, prompts, opts)
    was_training = model.training
    model.eval()
    try:
        if opts.num_beams > 1:
            from lmforge.generate.beam import beam_search

            eos = opts.eos_token_id if opts.eos_token_id is not None else model.config.usable_eos_token_ids
            beams = beam_search(model, prompts, opts, list(eos), build_processors(opts, min_tokens_to_keep=1))
            out = [tokens for per_prompt in beams for tokens, _ in per_prompt]
        else:
            engine, handles = _engine_run(model, prompts, opts, tokenizer, grammar=grammar)
            try:
                engine.run_until_done()
            finally:
                engine.close()
            out = [[e.token_id for e in h if e.token_id is not None] for h in handles]
    finally:
        model.train(was_training)
    if single and len(out) == 1:
        return out[0]
    return out


def generate_stream(
    model: Transformer, prompt_ids: Any, *, tokenizer: Any = None, skip_special_tokens: bool = True, **options: Any
) -> Iterator[Chunk]:
    """Yield each new token of ONE prompt as it is produced, with its UTF-8-safe text when a tokenizer is
    given (a character split across tokens is emitted once complete). The concatenated texts equal
    tokenizer.decode(all generated ids, skip_special_tokens=skip_special_tokens)."""
    opts = GenerationOptions.from_kwargs(**options)
    prompts, single = _normalize_prompts(prompt_ids)
    if not single or opts.num_return_sequences != 1 or opts.num_beams != 1:
        raise LmforgeError("streaming takes one prompt and returns one sequence (no beams, num_return_sequences=1).")
    _check_prompts(model, prompts, opts)
    model.eval()
    engine, (handle,) = _engine_run(model, prompts, opts, tokenizer, skip_special_tokens)
    try:
        while engine.has_work():
            engine.step()
            while not handle._events.empty():
                event = handle._events.get()
                if event.token_id is not None:
                    yield Chunk(event.token_id, event.text, event.finished)
                if event.finished:
                    return
    finally:
        engine.close()
