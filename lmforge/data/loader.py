"""Packed batches from token shards, with exactly resumable state.

The split's token stream is cut into windows of T+1 tokens, window i starting at i*T, so consecutive
windows share one token: inputs = w[:-1], labels = w[1:], and every token of the stream (but the very
first) is a label exactly once per epoch. Long documents are thereby chunked to the training length and
short ones packed together, separated by their EOS (the GPT-2/3 and Llama recipe).

Letters: B batch size, T sequence length.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from lmforge.data.shards import TokenShards
from lmforge.errors import LmforgeError

STATE_VERSION = 1
# Settings that fix the order of windows and the batch contents: resuming with others is not a resume.
_CHECKED = ("seed", "batch_size", "seq_len", "shuffle", "num_tokens")


def count_windows(shards: TokenShards, seq_len: int) -> int:
    """Windows of seq_len+1 tokens in the split; a clear error if there is not even one."""
    if seq_len < 1:
        raise LmforgeError(f"seq_len must be positive, got {seq_len}.")
    n = shards.num_tokens
    if n < seq_len + 1:
        raise LmforgeError(
            f"split {shards.split!r} of {shards.data_dir} has {n:,} tokens, fewer than seq_len + 1 = {seq_len + 1:,} "
            "needed for one sequence; use a shorter seq_len or prepare more data (or a larger val_fraction)."
        )
    return (n - 1) // seq_len


def position_ids(input_ids: np.ndarray, eos_token_id: int) -> np.ndarray:
    """[B, T] positions that restart at 0 at each window start and on the token after every EOS."""
    b, t = input_ids.shape
    steps = np.broadcast_to(np.arange(t), (b, t))
    is_start = np.zeros((b, t), dtype=bool)
    is_start[:, 0] = True
    is_start[:, 1:] = input_ids[:, :-1] == eos_token_id
    # The latest document start at or before each position, then the distance to it.
    latest_start = np.maximum.accumulate(np.where(is_start, steps, 0), axis=1)
    return steps - latest_start


def make_batch(
    shards: TokenShards, windows: np.ndarray | list[int], seq_len: int, mask_documents: bool = False
) -> dict[str, torch.Tensor]:
    """The batch of the given window indices: input_ids, labels (and position_ids) as int64 [B, T]."""
    # [B, T+1]
    rows = np.stack([shards.read(int(i) * seq_len, seq_len + 1) for i in windows])
    batch = {
        "input_ids": torch.from_numpy(np.ascontiguousarray(rows[:, :-1])),  # [B, T]
        "labels": torch.from_numpy(np.ascontiguousarray(rows[:, 1:])),  # [B, T]
    }
    if mask_documents:
        batch["position_ids"] = torch.from_numpy(position_ids(rows[:, :-1], shards.eos_token_id))
    return batch


class PackedLoader:
    """Infinite shuffled batches of packed windows; `state_dict()` / `load_state_dict()` resume exactly.

    Each epoch visits every window once, in the order `np.random.default_rng((seed, epoch)).permutation`
    (or in stream order without shuffle). Batches run on across epoch ends, so no window is dropped:
    a batch may hold the last windows of one epoch and the first of the next.
    With `mask_documents`, batches also hold `position_ids` that restart after every EOS; a model given
    position_ids without a mask then attends block-diagonally within documents.
    """

    def __init__(
        self,
        shards: TokenShards,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        shuffle: bool = True,
        mask_documents: bool = False,
    ) -> None:
        if batch_size < 1:
            raise LmforgeError(f"batch_size must be positive, got {batch_size}.")
        self.shards = shards
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.shuffle = shuffle
        self.mask_documents = mask_documents
        self.windows_per_epoch = count_windows(shards, seq_len)
        self.epoch = 0  # epoch of the next window to be served
        self.position = 0  # windows of that epoch already served
        self._order: tuple[int, np.ndarray] | None = None

    def order(self, epoch: int) -> np.ndarray:
        """Window indices of `epoch`, in the order they are served."""
        if self._order is None or self._order[0] != epoch:
            if self.shuffle:
                perm = np.random.default_rng((self.seed, epoch)).permutation(self.windows_per_epoch)
            else:
                perm = np.arange(self.windows_per_epoch)
            self._order = (epoch, perm)
        return self._order[1]

    def next_windows(self) -> np.ndarray:
        """The window indices of the next batch; advances the position."""
        parts: list[np.ndarray] = []
        need = self.batch_size
        while need:
            take = min(need, self.windows_per_epoch - self.position)
            parts.append(self.order(self.epoch)[self.position : self.position + take])
            self.position += take
            need -= take
            if self.position == self.windows_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
        return np.concatenate(parts)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return make_batch(self.shards, self.next_windows(), self.seq_len, self.mask_documents)

    def state_dict(self) -> dict[str, Any]:
        """Plain ints and bools (JSON- and torch.save-friendly): where the loader is and what it was built with."""
        return {
            "version": STATE_VERSION,
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "shuffle": self.shuffle,
            "num_tokens": self.shards.num_tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where `state` was saved; raises LmforgeError if the settings or data differ."""
        missing = [k for k in ("epoch", "position", *_CHECKED) if k not in state]
        if missing:
            raise LmforgeError(f"data loader state lacks {', '.join(missing)}; it is not a PackedLoader state.")
        mine = self.state_dict()
        diffs = [f"{k} was {state[k]!r}, now {mine[k]!r}" for k in _CHECKED if state[k] != mine[k]]
        if diffs:
            raise LmforgeError(
                f"cannot resume the data order: {'; '.join(diffs)} (num_tokens differs when the data changed). "
                "Resume with the same data and settings, or start without the saved loader state."
            )
        if not 0 <= int(state["position"]) < self.windows_per_epoch or int(state["epoch"]) < 0:
            raise LmforgeError(f"data loader state has epoch {state['epoch']}, position {state['position']}: corrupt.")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def sequential_batches(
    shards: TokenShards, batch_size: int, seq_len: int, mask_documents: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """Every window exactly once, in stream order; the last batch may be smaller. For evaluation."""
    if batch_size < 1:
        raise LmforgeError(f"batch_size must be positive, got {batch_size}.")
    n = count_windows(shards, seq_len)
    for start in range(0, n, batch_size):
        yield make_batch(shards, range(start, min(start + batch_size, n)), seq_len, mask_documents)


class RankShare:
    """Rank `rank` of `world` data-parallel ranks reads every world-th micro-batch of `batches`, so that the
    global sequence of micro-batches is the same for every decomposition: 2 ranks with accumulation 1 read
    what 1 process with accumulation 2 reads. The position (`state_dict`) is the global one, the same on
    every rank, so a run resumes at any world size whose global batch is the same."""

    def __init__(self, batches: Any, rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __iter__(self) -> RankShare:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        mine = None
        for r in range(self.world):
            batch = next(self.batches)
            if r == self.rank:
                mine = batch
        assert mine is not None
        return mine

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)
