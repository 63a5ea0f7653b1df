"""The engine's KV cache: fixed-size blocks, a block table per request, prefix caching (vLLM's layout).

Keys and values of all requests live in one slot-major buffer per layer, [N * BS, K, D] for N blocks of BS
slots. A request's block table lists its blocks in position order, so position p of the request is slot
`table[p // BS] * BS + p % BS`. Block 0 is never handed out: it is the scratch block that padding writes
into and padded reads point at (masked out).

Prefix caching: a full block is identified by hash(parent block's hash, its BS token ids), so equal
prefixes map to equal chains of hashes. A request that starts with a cached chain reuses those blocks
(reference-counted) instead of recomputing them. Blocks nobody references stay cached and are reused
least-recently-freed first when the free list runs out.

Shape letters: B batch rows, T new tokens per row, S key slots read per row, K kv heads, D head_dim.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch

from lmforge.config import ModelConfig


def block_hashes(tokens: Sequence[int], block_size: int) -> list[int]:
    """The chain of hashes of the full blocks of `tokens` (a partial last block has none)."""
    out, parent = [], 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[start : start + block_size])))
        out.append(parent)
    return out


class BlockManager:
    """Hands out blocks, counts references, and keeps freed full blocks findable by hash (LRU)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise ValueError("the paged cache needs at least 2 blocks (block 0 is scratch)")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.free: list[int] = list(range(num_blocks - 1, 0, -1))  # pop() hands out low ids first
        self.refs = [0] * num_blocks
        self.hash_of: dict[int, int] = {}  # block -> hash, for full blocks registered as a prefix
        self.by_hash: dict[int, int] = {}  # hash -> block
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody holds, oldest first

    @property
    def available(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def used(self) -> int:
        """Blocks held by at least one request."""
        return self.num_blocks - 1 - self.available

    def allocate(self) -> int | None:
        """A block for new keys and values, or None when every block is held."""
        if self.free:
            block = self.free.pop()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)  # least recently freed
            del self.by_hash[self.hash_of.pop(block)]
        else:
            return None
        self.refs[block] = 1
        return block

    def release(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            self.refs[block] -= 1
            assert self.refs[block] >= 0, "a block was released twice"
            if self.refs[block] == 0:
                if block in self.hash_of:
                    self.evictable[block] = None  # keep its contents findable until it is needed
                else:
                    self.free.append(block)

    def register(self, block: int, block_hash: int) -> None:
        """Make a full block findable by the hash of its prefix (first writer wins)."""
        if block_hash not in self.by_hash and block not in self.hash_of:
            self.by_hash[block_hash] = block
            self.hash_of[block] = block_hash

    def lookup(self, hashes: Sequence[int]) -> list[int]:
        """The longest run of cached blocks matching `hashes` from the start, each now referenced."""
        found = []
        for h in hashes:
            block = self.by_hash.get(h)
            if block is None:
                break
            found.append(block)
        for block in found:
            if self.refs[block] == 0:
                self.evictable.pop(block, None)
            self.refs[block] += 1
        return found


class PagedKVCache:
    """The per-layer key/value buffers, [N * BS, K, D], shared by every request.

    With `int8`, keys and values are stored in int8 with one fp32 scale per slot and head (symmetric absmax
    over the head's D values, as KIVI / vLLM's fp8 cache scale per token): a quarter of fp32's bytes, half of
    bf16's, for an error of at most half a step of 1/127 of each vector's largest entry."""

    def __init__(
        self,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device | str,
        int8: bool = False,
    ) -> None:
        shape = (num_blocks * block_size, config.num_kv_heads, config.head_dim)
        store = torch.int8 if int8 else dtype
        self.k = [torch.zeros(shape, dtype=store, device=device) for _ in range(config.num_layers)]
        self.v = [torch.zeros(shape, dtype=store, device=device) for _ in range(config.num_layers)]
        self.k_scale: list[torch.Tensor] = []
        self.v_scale: list[torch.Tensor] = []
        if int8:
            self.k_scale = [torch.zeros(shape[:2], device=device) for _ in range(config.num_layers)]
            self.v_scale = [torch.zeros(shape[:2], device=device) for _ in range(config.num_layers)]
        self.block_size, self.int8, self.dtype = block_size, int8, dtype

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, int8: bool = False) -> int:
        slots = 2 * config.num_layers * block_size * config.num_kv_heads
        if int8:
            return slots * (config.head_dim + 4)  # int8 values and one fp32 scale per slot and head
        return slots * config.head_dim * torch.empty((), dtype=dtype).element_size()

    def view(self, write_slots: torch.Tensor, read_slots: torch.Tensor) -> PagedView:
        """The cache as one forward sees it: new keys go to `write_slots` [B, T], attention reads
        `read_slots` [B, S] (each row's slots in position order, padded with scratch slots)."""
        return PagedView(self, write_slots, read_slots)


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K, D] -> int8 [M, K, D] and scales [M, K] (absmax / 127)."""
    scale = (x.abs().amax(dim=-1).float() / 127).clamp(min=torch.finfo(torch.float32).tiny)
    return torch.round(x.float() / scale[..., None]).clamp(-127, 127).to(torch.int8), scale


class PagedView:
    """`lmforge.model.Cache` for one forward of the engine: writes and reads at the slots it was given."""

    def __init__(self, cache: PagedKVCache, write_slots: torch.Tensor, read_slots: torch.Tensor) -> None:
        self.cache, self.write_slots, self.read_slots = cache, write_slots.reshape(-1), read_slots

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, K, T, D = k.shape
        cache = self.cache
        keys, values = cache.k[layer], cache.v[layer]
        new_k = k.transpose(1, 2).reshape(B * T, K, D)  # [B*T, K, D]
        new_v = v.transpose(1, 2).reshape(B * T, K, D)
        if not cache.int8:
            keys.index_copy_(0, self.write_slots, new_k)
            values.index_copy_(0, self.write_slots, new_v)
            # [B, S, K, D] -> [B, K, S, D]
            return keys[self.read_slots].transpose(1, 2), values[self.read_slots].transpose(1, 2)
        out = []
        for store, scales, new in ((keys, cache.k_scale[layer], new_k), (values, cache.v_scale[layer], new_v)):
            q, scale = _quantize_rows(new)
            store.index_copy_(0, self.write_slots, q)
            scales.index_copy_(0, self.write_slots, scale)
            read = store[self.read_slots].to(k.dtype) * scales[self.read_slots][..., None].to(k.dtype)  # [B, S, K, D]
            out.append(read.transpose(1, 2))  # [B, K, S, D]
        return out[0], out[1]
