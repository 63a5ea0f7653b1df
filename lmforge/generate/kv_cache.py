"""A preallocated KV cache for one static batch (gpt-fast style): one [B, K, S_max, D] buffer per layer.

Only the K kv heads are stored, so grouped-query attention shrinks the cache by H/K. Slots are filled
left to right, the same slots for every row; `length` is how many are in use, advanced once the last
layer has written a forward's keys. The caller gives the model positions and the mask (`positions`,
`causal_mask` build the usual ones). `reorder` follows beams in beam search. The engine's paged cache
(paged.py), with a length per request, is what serves concurrent requests; this one serves the
strategies that need one batch in lockstep (beams, speculative verification, GLM infilling, scoring).
"""

from __future__ import annotations

import torch

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError


class KVCache:
    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)  # [B, K, S_max, D]
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.max_length = max_length
        self.length = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, K, T, D] at slots [length, length+T); return slots [0, length+T)."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_length:
            raise LmforgeError(
                f"the KV cache holds {self.max_length} tokens and this step needs {end}; "
                "lower max_new_tokens or shorten the prompt."
            )
        keys, values = self.k[layer], self.v[layer]
        keys.narrow(2, start, end - start).copy_(k)  # (narrow: one op where indexing takes three slices)
        values.narrow(2, start, end - start).copy_(v)
        if layer == len(self.k) - 1:
            self.length = end
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def positions(self, T: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Position ids [T] of the next T tokens when the slots are the positions (no padding)."""
        return torch.arange(self.length, self.length + T, device=device)

    def causal_mask(self, T: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
        """The [1, 1, T, S] mask of T new tokens after `length` cached ones (None for one token)."""
        if T == 1:
            return None
        q = torch.arange(self.length, self.length + T, device=device)[:, None]
        return (torch.arange(self.length + T, device=device)[None, :] <= q)[None, None]

    def feed(self, model: torch.nn.Module, ids: torch.Tensor, logits_to_keep: int = 0) -> torch.Tensor:
        """Run `ids` [B, T] after the cached tokens with the usual positions and causal mask."""
        T = ids.shape[1]
        return model(ids, self.positions(T, ids.device), self.causal_mask(T, ids.device), self, logits_to_keep)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search: each surviving beam takes its parent's cache)."""
        for i in range(len(self.k)):
            self.k[i] = self.k[i].index_select(0, index)
            self.v[i] = self.v[i].index_select(0, index)

    def crop(self, length: int) -> None:
        """Forget the slots from `length` on (speculative decoding rejects drafted tokens)."""
        self.length = min(self.length, length)
