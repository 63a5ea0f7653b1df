"""Beam search over an explicit KV cache, with the scoring and stopping rules of transformers' `_beam_search`.

All prompts go through the model as one left-padded batch of B*N rows (row b*N + j is beam j of prompt b):
each prompt is prefilled once and its cache fanned out to N beams, then every step feeds one token per row
and `Decoder.reorder` makes each surviving beam take over its parent's cache, mask and position counter.

The rules, as transformers 5 implements them (generation/utils.py, `_beam_search` and helpers):
- step scores are log_softmax of the fp32 logits, then the processors (which see each beam's tokens), plus
  the beam's running score; the K = max(2, 1 + number of eos ids) * N best candidates over N x V are kept.
  At the start only beam 0 is live (the others score -1e9), so the first step does not pick N copies.
- a candidate ends when its token is an eos id, or at max_new_tokens. Only ends among the N best candidates
  become finished hypotheses, scored sum(logprob) / generated_length ** length_penalty, where the generated
  length counts the new tokens including the eos, not the prompt. Each prompt keeps its N best hypotheses.
- the N best candidates that did not end continue as the beams of the next step.
- a prompt stops accepting hypotheses when early_stopping is True and it has N of them, or once an upper
  estimate of what its best running beam could still reach is no better than its worst hypothesis: the
  estimate divides that beam's score by the current generated length ** length_penalty, or by
  max_new_tokens ** length_penalty when early_stopping is "never" and length_penalty > 0 (a true bound then).
- the search ends when no prompt can improve, when early_stopping is True and every prompt has N hypotheses,
  or after max_new_tokens steps. The result is the num_return_sequences best hypotheses, best first.

Shape letters: B prompts, N beams per prompt, K candidates per prompt, V vocab, P padded prompt length,
L max_new_tokens, T tokens generated so far.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.generate.decode import Decoder, left_pad
from lmforge.generate.gemv import ParallelGemv
from lmforge.generate.options import GenerationOptions
from lmforge.generate.processors import PAD, LogitsProcessor, apply_processors
from lmforge.model import Transformer

# transformers' score for "no such beam/hypothesis": finite, so that sums and divisions stay ordered.
IMPOSSIBLE = -1.0e9


@torch.no_grad()
def beam_search(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    options: GenerationOptions,
    eos_token_ids: Sequence[int],
    processors: list[LogitsProcessor],
) -> list[list[tuple[list[int], float]]]:
    """Per prompt, the `options.num_return_sequences` best beams, best first, as (new tokens, score).

    The tokens are the generated ones only (no prompt, no padding), ending with the eos token if one was
    generated; the score is the one transformers reports in `sequences_scores`: the sum of the processed
    log-probabilities divided by (number of generated tokens) ** length_penalty. Uses options.num_beams,
    max_new_tokens, length_penalty, early_stopping and num_return_sequences; `eos_token_ids` end a beam
    (may be empty) and `processors` are applied to the log-probabilities at every step (may be empty).
    """
    N, L = options.num_beams, options.max_new_tokens
    if options.num_return_sequences > N:
        raise LmforgeError(
            f"num_return_sequences ({options.num_return_sequences}) cannot exceed num_beams ({N}); "
            "raise num_beams or ask for fewer sequences."
        )
    length_penalty, early_stopping = options.length_penalty, options.early_stopping
    device = next(model.parameters()).device
    batch = left_pad(prompts, device)
    B, P = batch.input_ids.shape
    eos = torch.tensor(list(eos_token_ids or []), dtype=torch.long, device=device)
    # Keep enough candidates that N of them are still running even if every beam's best tokens are eos ids.
    K = max(2, 1 + eos.numel()) * N

    decoder = Decoder(model, batch, L)
    first_logits = decoder.prefill()  # [B, V]
    fan_out = torch.arange(B, device=device).repeat_interleave(N)  # [B*N]
    decoder.reorder(fan_out)
    logits = first_logits.index_select(0, fan_out)  # [B*N, V]
    # What the processors see: each row's prompt with PAD in its padding slots, then its generated tokens.
    tokens = torch.where(batch.attention_mask.bool(), batch.input_ids, PAD).index_select(0, fan_out)  # [B*N, P]

    running = torch.full((B, N), IMPOSSIBLE, device=device)  # [B, N] sum of logprobs of each running beam
    running[:, 0] = 0.0
    # Finished hypotheses: N slots per prompt, best first; an empty slot scores IMPOSSIBLE.
    done_scores = torch.full((B, N), IMPOSSIBLE, device=device)
    done_tokens = torch.full((B, N, L), PAD, dtype=torch.long, device=device)
    done_lengths = torch.zeros(B, N, dtype=torch.long, device=device)
    done_filled = torch.zeros(B, N, dtype=torch.bool, device=device)
    improvable = torch.ones(B, dtype=torch.bool, device=device)  # may a new hypothesis still enter?
    among_best_n = torch.arange(K, device=device) < N  # [K]: candidates are sorted, best first
    first_row = torch.arange(B, device=device)[:, None] * N  # [B, 1]

    with ParallelGemv(model):  # one token per row per step: matrix-vector products
        for t in range(L):
            logprobs = apply_processors(processors, tokens, torch.log_softmax(logits, dim=-1))  # [B*N, V]
            V = logprobs.shape[-1]
            totals = (logprobs.view(B, N, V) + running[:, :, None]).view(B, N * V)
            cand_scores, flat = totals.topk(K, dim=-1)  # [B, K], best first
            parent, token = flat // V, flat % V  # [B, K]
            ends = torch.isin(token, eos) | (t == L - 1)  # [B, K]

            # Finished hypotheses: the ending candidates among the N best, while the prompt accepts any.
            accepting = improvable & ~(done_filled.all(-1) & (early_stopping is True))  # [B]
            new = ends & among_best_n & accepting[:, None]  # [B, K]
            new_scores = torch.where(new, cand_scores / ((t + 1) ** length_penalty), float("-inf"))
            generated = tokens[:, P:].view(B, N, t).gather(1, parent[:, :, None].expand(B, K, t))  # [B, K, T]
            cand_tokens = F.pad(
                torch.cat([generated, token[:, :, None]], dim=-1), (0, L - t - 1), value=PAD
            )  # [B, K, L]
            keep = torch.cat([done_scores, new_scores], dim=1).topk(N, dim=-1).indices  # [B, N]
            done_scores = torch.cat([done_scores, new_scores], dim=1).gather(1, keep)
            done_filled = torch.cat([done_filled, new], dim=1).gather(1, keep)
            done_lengths = torch.cat([done_lengths, torch.full_like(token, t + 1)], dim=1).gather(1, keep)
            done_tokens = torch.cat([done_tokens, cand_tokens], dim=1).gather(1, keep[:, :, None].expand(B, N, L))
            if t == L - 1:
                break

            # Running beams: the N best candidates that did not end.
            live_scores = cand_scores + ends.float() * IMPOSSIBLE  # [B, K]
            pick = live_scores.topk(N, dim=-1).indices  # [B, N]
            running = live_scores.gather(1, pick)
            beam_parent, beam_token = parent.gather(1, pick), token.gather(1, pick)  # [B, N]

            # Can the best running beam still beat the worst hypothesis? (transformers' heuristic, see above)
            estimate_length = L if early_stopping == "never" and length_penalty > 0 else t + 1
            best_possible = running[:, :1] / (estimate_length**length_penalty)  # [B, 1]
            worst_done = torch.where(done_filled, done_scores.min(-1, keepdim=True).values, IMPOSSIBLE)  # [B, N]
            improvable &= (best_possible > worst_done).any(-1)
            if not bool(improvable.any()) or (early_stopping is True and bool(done_filled.all())):
                break

            source = (first_row + beam_parent).view(-1)  # [B*N] the row each new beam continues
            decoder.reorder(source)
            step_tokens = beam_token.view(-1)
            tokens = torch.cat([tokens.index_select(0, source), step_tokens[:, None]], dim=1)
            logits = decoder.step(step_tokens)

    # A slot is empty only if every candidate scored -inf (processors that ban everything): it comes back
    # as no tokens with the IMPOSSIBLE score.
    lengths, scores, ids = done_lengths.tolist(), done_scores.tolist(), done_tokens.tolist()
    return [[(ids[b][r][: lengths[b][r]], scores[b][r]) for r in range(options.num_return_sequences)] for b in range(B)]
