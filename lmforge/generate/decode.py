"""The decoding loop's model side: a batch's KV cache, prefill, then one token per row per step.

Choosing the tokens (greedy, sampling, beams) is done by the callers in api.py, beam.py and speculative.py.

Prompts of different lengths are left-padded into one batch: each row gets position ids that start at 0
at its first real token and an attention mask that hides its padding, so every row decodes exactly as
it would alone.

Shape letters: B batch, P padded prompt length, V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lmforge.errors import LmforgeError
from lmforge.generate.kv_cache import KVCache
from lmforge.model import Transformer, build_attention_mask


@dataclass
class Prompts:
    """A left-padded batch of prompts."""

    input_ids: torch.Tensor  # [B, P], pad slots hold 0
    attention_mask: torch.Tensor  # [B, P], 1 for real tokens
    lengths: list[int]


def left_pad(prompts: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> Prompts:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise LmforgeError("empty prompt: give at least one token (e.g. the BOS token) per prompt.")
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    mask = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return Prompts(ids, mask, [len(p) for p in prompts])


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids [B, S] that count real tokens only (padding slots get 0), as transformers does."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


class Decoder:
    """Holds the cache and masks of one batch; `prefill` once, then `step` once per new token."""

    def __init__(self, model: Transformer, prompts: Prompts, max_new_tokens: int) -> None:
        c = model.config
        total = prompts.input_ids.shape[1] + max_new_tokens
        if total > c.max_position_embeddings:
            raise LmforgeError(
                f"prompt ({prompts.input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds the "
                f"model's context of {c.max_position_embeddings} tokens; shorten the prompt or generate less."
            )
        self.model = model
        dtype = next(model.parameters()).dtype
        self.cache = KVCache(c, prompts.input_ids.shape[0], total, dtype, prompts.input_ids.device)
        self.mask = prompts.attention_mask
        self.padded = bool((prompts.attention_mask == 0).any())
        self.next_position = prompts.attention_mask.sum(-1, keepdim=True)  # [B, 1]
        self.prompts = prompts

    @torch.inference_mode()  # lighter than no_grad: no autograd bookkeeping at all
    def prefill(self) -> torch.Tensor:
        """Logits [B, V] for the token after each prompt."""
        ids = self.prompts.input_ids
        if self.padded:
            mask = build_attention_mask(self.mask, None, ids.shape[1])  # causal, padding hidden: [B, 1, P, P]
            logits = self.model(ids, positions_from_mask(self.mask), mask, self.cache, logits_to_keep=1)
        else:
            logits = self.cache.feed(self.model, ids, logits_to_keep=1)
        return logits[:, -1].float()

    @torch.inference_mode()  # lighter than no_grad: no autograd bookkeeping at all
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens [B] and return the logits [B, V] for the next position."""
        if self.padded:
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
            mask = self.mask.bool()[:, None, None, :]  # [B, 1, 1, S]: the new token sees the real slots
            logits = self.model(tokens[:, None], self.next_position, mask, self.cache)
            self.next_position = self.next_position + 1
        else:  # positions follow the cache slots
            logits = self.cache.feed(self.model, tokens[:, None])
        return logits[:, -1].float()

    def reorder(self, index: torch.Tensor) -> None:
        """Make row i of the batch a copy of row `index[i]`: its cache, mask and position counter.

        Beam search calls this after reselecting beams (each survivor takes its parent's state); `index`
        may repeat rows or have more rows than the batch, e.g. to fan one prefilled prompt out into beams.
        """
        index = index.to(self.mask.device)
        self.cache.reorder(index)
        self.mask = self.mask.index_select(0, index)
        self.next_position = self.next_position.index_select(0, index)
        p = self.prompts
        self.prompts = Prompts(
            p.input_ids.index_select(0, index),
            p.attention_mask.index_select(0, index),
            [p.lengths[i] for i in index.tolist()],
        )
