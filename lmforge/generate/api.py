"""`lmforge.generate` and `lmforge.generate_stream`: the public decoding entry points.

    generate(model, [1, 2, 3], max_new_tokens=20)                   -> [ids...]  (new tokens only)
    generate(model, [[1, 2], [3, 4, 5]], do_sample=True, seed=0)     -> [[...], [...]]
    for chunk in generate_stream(model, ids, tokenizer=tok): print(chunk.text, end="")

A row stops at its first EOS (kept in the output, as transformers does) or once its decoded text contains
one of `stop_strings`; the batch stops when every row has.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.generate.decode import Decoder, left_pad
from lmforge.generate.gemv import ParallelGemv
from lmforge.generate.options import GenerationOptions
from lmforge.generate.processors import PAD, apply_processors, build_processors, sample
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


class _StopStrings:
    """Per row: whether the generated text so far contains a stop string (checked on a decoded tail)."""

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str]) -> None:
        self.tokenizer, self.stops = tokenizer, list(stop_strings)
        self.window = max((len(s) for s in self.stops), default=0) + 16  # enough tokens to cover any stop

    def hit(self, generated: list[int]) -> bool:
        tail = self.tokenizer.decode(generated[-self.window :])
        return any(s in tail for s in self.stops)


def _run(
    model: Transformer, prompts: list[list[int]], options: GenerationOptions, tokenizer: Any
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (tokens [N], newly finished [N]) per step for N = prompts x num_return_sequences rows."""
    if options.stop_strings and tokenizer is None:
        raise LmforgeError("stop_strings need a tokenizer: pass tokenizer=... to decode the generated text.")
    rows = [p for p in prompts for _ in range(options.num_return_sequences)]
    device = next(model.parameters()).device
    batch = left_pad(rows, device)
    eos = options.eos_token_id if options.eos_token_id is not None else model.config.usable_eos_token_ids
    eos_t = torch.tensor(list(eos), dtype=torch.long, device=device)
    processors = build_processors(options)
    history = torch.where(batch.attention_mask.bool(), batch.input_ids, PAD)  # [N, P]
    generator = torch.Generator(device).manual_seed(options.seed) if options.seed is not None else None
    stops = _StopStrings(tokenizer, options.stop_strings) if options.stop_strings else None
    generated: list[list[int]] = [[] for _ in rows]
    done = torch.zeros(len(rows), dtype=torch.bool, device=device)
    decoder = Decoder(model, batch, options.max_new_tokens)
    logits = decoder.prefill()  # a real matrix product: all of BLAS's threads
    with ParallelGemv(model):  # one token per row per step: matrix-vector products
        for step in range(options.max_new_tokens):
            scores = apply_processors(processors, history, logits) if processors else logits
            tokens = sample(scores, generator) if options.do_sample else scores.argmax(-1)
            newly = ~done & torch.isin(tokens, eos_t) if eos else torch.zeros_like(done)
            if stops is not None:
                for i in range(len(rows)):
                    if not done[i]:
                        generated[i].append(int(tokens[i]))
                        if not newly[i] and stops.hit(generated[i]):
                            newly[i] = True
            yield tokens, newly
            done |= newly
            if bool(done.all()) or step == options.max_new_tokens - 1:
                return
            if processors:  # only processors look at the history
                history = torch.cat([history, tokens[:, None]], dim=1)
            logits = decoder.step(tokens)


def generate(model: Transformer, prompt_ids: Any, *, tokenizer: Any = None, **options: Any) -> list:
    """Generated token ids (without the prompt) for one prompt or a batch; options as GenerationOptions.

    One prompt -> list[int]; a batch -> list[list[int]]; with num_return_sequences = n > 1, n lists per
    prompt (prompt-major, as transformers orders them).
    """
    opts = GenerationOptions.from_kwargs(**options)
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
            out = [[] for _ in range(len(prompts) * opts.num_return_sequences)]
            finished = [False] * len(out)
            for tokens, newly in _run(model, prompts, opts, tokenizer):
                for i, t in enumerate(tokens.tolist()):
                    if not finished[i]:
                        out[i].append(t)
                        finished[i] = bool(newly[i])
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
    text_stream = tokenizer.decode_stream(skip_special_tokens=skip_special_tokens) if tokenizer is not None else None
    model.eval()
    for step, (tokens, newly) in enumerate(_run(model, prompts, opts, tokenizer)):
        token = int(tokens[0])
        last = bool(newly[0]) or step == opts.max_new_tokens - 1
        text = ""
        if text_stream is not None:
            text = text_stream.push(token) + (text_stream.flush() if last else "")
        yield Chunk(token, text, last)
        if last:
            return
