"""A preallocated KV cache (gpt-fast style): one [B, K, S_max, D] buffer per layer for keys and values.

Only the K kv heads are stored, so grouped-query attention shrinks the cache by H/K. Slots are filled
left to right; `length` is how many are in use. `reorder` follows beams in beam search.
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
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows `index` (beam search: each surviving beam takes its parent's cache)."""
        for i in range(len(self.k)):
            self.k[i] = self.k[i].index_select(0, index)
            self.v[i] = self.v[i].index_select(0, index)

    def crop(self, length: int) -> None:
        """Forget the slots from `length` on (speculative decoding rejects drafted tokens)."""
        self.length = min(self.length, length)
