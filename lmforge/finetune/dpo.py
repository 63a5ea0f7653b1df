"""`lmforge dpo`: direct preference optimisation (Rafailov et al. 2023) and IPO (Azar et al. 2023).

Data: JSONL with "prompt", "chosen", "rejected". With a chat format the prompt is a user turn and each
response an assistant turn (the loss covers the response and its end-of-turn token, as in SFT); without
one the texts are concatenated and EOS ends the response.

The reference model is the starting model, frozen: its log-probabilities of every pair are computed once
before training (for LoRA runs that is the base with the adapters at their zero initialisation, i.e.
disabled), so no second model is kept in memory while training.

    sigmoid: loss = -log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))      pi = sum of log-probs
    ipo:     loss = ((pi_c - pi_r) - (ref_c - ref_r) - 1 / (2 beta))^2          pi = mean log-prob per token
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.finetune.config import DPO_LOSSES, DPOConfig
from lmforge.finetune.lora import LoraConfig
from lmforge.finetune.runs import Start, checkpoint_writer, record_run, start_run
from lmforge.finetune.sft import split_examples
from lmforge.finetune.sft_data import Example, render
from lmforge.jsonl import read_jsonl
from lmforge.model import Transformer
from lmforge.options import to_mapping
from lmforge.parallel.mesh import ParallelConfig
from lmforge.plots import plot_training, read_metrics
from lmforge.runtime import is_rank0, model_device
from lmforge.train.config import TrainConfig, check_context, resolve_precision
from lmforge.train.loop import TrainResult, train
from lmforge.train.objectives import IGNORE_INDEX, LossOutput

LOSSES = DPO_LOSSES


@dataclass
class Pair:
    chosen: Example
    rejected: Example


def read_preferences(path: str | Path) -> list[tuple[str, str, str]]:
    rows = []
    for number, obj in read_jsonl(path):
        values = [obj.get(k) for k in ("prompt", "chosen", "rejected")]
        if not all(isinstance(v, str) for v in values):
            raise LmforgeError(f"{path}:{number}: a preference example needs string 'prompt', 'chosen' and 'rejected'.")
        if not values[1] or not values[2]:
            raise LmforgeError(f"{path}:{number}: 'chosen' and 'rejected' must not be empty.")
        rows.append(tuple(values))
    return rows


def encode_pair(tokenizer: Any, prompt: str, response: str, chat: bool) -> Example:
    if chat:
        return render(tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    p = tokenizer.encode(prompt, add_special_tokens=True)
    r = tokenizer.encode(response) + [tokenizer.eos_token_id]
    return Example(p + r, [IGNORE_INDEX] * len(p) + r)


def build_pairs(
    tokenizer: Any, rows: list[tuple[str, str, str]], max_tokens: int, chat: bool, too_long: str = "truncate"
) -> tuple[list[Pair], dict[str, int]]:
    pairs, counts = [], {"pairs": 0, "truncated": 0, "skipped": 0}
    for prompt, chosen, rejected in rows:
        a, b = encode_pair(tokenizer, prompt, chosen, chat), encode_pair(tokenizer, prompt, rejected, chat)
        if max(len(a.ids), len(b.ids)) > max_tokens:
            if too_long == "skip":
                counts["skipped"] += 1
                continue
            counts["truncated"] += 1
            a, b = (
                Example(a.ids[:max_tokens], a.labels[:max_tokens]),
                Example(b.ids[:max_tokens], b.labels[:max_tokens]),
            )
        if all(x == IGNORE_INDEX for x in a.labels) or all(x == IGNORE_INDEX for x in b.labels):
            counts["skipped"] += 1
            continue
        pairs.append(Pair(a, b))
    counts["pairs"] = len(pairs)
    if not pairs:
        raise LmforgeError(f"no usable preference pairs ({counts}); raise --seq-len or check the data.")
    return pairs, counts


def pair_batch(pairs: list[Pair], pad_id: int) -> dict[str, torch.Tensor]:
    """Rows: the B chosen responses, then the B rejected ones, right-padded; labels shifted by one."""
    rows = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r.ids)] = torch.tensor(r.ids)
        labels[i, : len(r.labels)] = torch.tensor(r.labels)
    return {"input_ids": ids[:, :-1], "labels": labels[:, 1:]}


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: summed log-prob of the labelled tokens, and how many there are."""
    mask = labels != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (logp * mask).sum(-1), mask.sum(-1)


@torch.inference_mode()
def reference_logps(model: Transformer, pairs: list[Pair], batch_size: int, pad_id: int) -> torch.Tensor:
    """[N, 2] summed log-probs of (chosen, rejected) under the frozen starting model."""
    model.eval()
    out = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        batch = pair_batch(chunk, pad_id)
        logps, _ = sequence_logps(model(batch["input_ids"]), batch["labels"])
        out.append(torch.stack([logps[: len(chunk)], logps[len(chunk) :]], dim=1))
    model.train()
    return torch.cat(out)


def dpo_loss(
    policy: torch.Tensor, reference: torch.Tensor, beta: float, loss_type: str
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair losses from [B, 2] (chosen, rejected) policy and reference log-probs, and summed stats."""
    if loss_type not in LOSSES:
        raise LmforgeError(f"unknown DPO loss {loss_type!r}; use one of {', '.join(LOSSES)}.")
    logits = (policy[:, 0] - policy[:, 1]) - (reference[:, 0] - reference[:, 1])
    losses = -F.logsigmoid(beta * logits) if loss_type == "sigmoid" else (logits - 1 / (2 * beta)) ** 2
    rewards = beta * (policy - reference).detach()  # [B, 2] implicit rewards
    stats = {
        "reward_chosen": rewards[:, 0].sum(),
        "reward_rejected": rewards[:, 1].sum(),
        "reward_margin": (rewards[:, 0] - rewards[:, 1]).sum(),
        "preference_accuracy": (rewards[:, 0] > rewards[:, 1]).float().sum(),
    }
    return losses, stats


def dpo_objective(beta: float, loss_type: str):
    def objective(model: Transformer, batch: dict[str, torch.Tensor]) -> LossOutput:
        logps, counts = sequence_logps(model(batch["input_ids"]), batch["labels"])
        n = logps.shape[0] // 2
        policy = torch.stack([logps[:n], logps[n:]], dim=1)  # [B, 2]
        reference = batch["reference"]
        if loss_type == "ipo":  # IPO compares mean log-probs per token
            lengths = torch.stack([counts[:n], counts[n:]], dim=1).clamp(min=1)
            policy, reference = policy / lengths, reference / lengths
        losses, stats = dpo_loss(policy, reference, beta, loss_type)
        return LossOutput(losses.sum(), torch.tensor(float(n)), stats)

    return objective


class PairLoader:
    """Batches of B pairs (2B rows) with their reference log-probs; seeded order per epoch, exact resume."""

    def __init__(
        self,
        pairs: list[Pair],
        reference: torch.Tensor,
        batch_size: int,
        pad_id: int,
        seed: int = 0,
        shuffle: bool = True,
    ) -> None:
        self.pairs, self.reference, self.batch_size, self.pad_id = pairs, reference, batch_size, pad_id
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.cursor = 0, 0

    def __iter__(self) -> PairLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        picked = []
        for _ in range(self.batch_size):
            order = (
                np.random.default_rng((self.seed, self.epoch)).permutation(len(self.pairs))
                if self.shuffle
                else np.arange(len(self.pairs))
            )
            picked.append(int(order[self.cursor]))
            self.cursor += 1
            if self.cursor == len(self.pairs):
                self.epoch, self.cursor = self.epoch + 1, 0
        batch = pair_batch([self.pairs[i] for i in picked], self.pad_id)
        batch["reference"] = self.reference[picked]
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "cursor": self.cursor, "pairs": len(self.pairs), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("pairs") != len(self.pairs) or state.get("seed") != self.seed:
            raise LmforgeError("the preference data or seed changed since the checkpoint; resume with the same ones.")
        self.epoch, self.cursor = state["epoch"], state["cursor"]


@dataclass
class DPOOutput:
    result: TrainResult
    run_dir: Path
    start: Start
    counts: dict[str, int]
    plot: Path | None


def dpo(
    model: str | Path,
    data: str | Path,
    run_dir: str | Path,
    cfg: TrainConfig,
    options: DPOConfig | None = None,
    lora: LoraConfig | None = None,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    parallel: ParallelConfig | None = None,
) -> DPOOutput:
    """Preference optimisation of `model` (a checkpoint or run directory) on JSONL pairs `data`."""
    options = options or DPOConfig()
    run_dir = Path(run_dir)
    start = start_run(model, run_dir, options.method, lora, resume, cfg.seed, overwrite)
    check_context(start.model, cfg)
    cfg = resolve_precision(cfg, model_device(start.model), announce=progress)
    beta, loss_type = options.beta, options.loss
    tok = start.tokenizer
    chat = options.chat
    use_chat = chat if chat is not None else (tok.chat_format is not None or tok.chat_template is not None)
    train_rows, val_rows = split_examples(read_preferences(data), options.val_fraction, cfg.seed)
    pairs, counts = build_pairs(tok, train_rows, cfg.seq_len + 1, use_chat, options.too_long)
    val_pairs = build_pairs(tok, val_rows, cfg.seq_len + 1, use_chat, options.too_long)[0] if val_rows else []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    # The reference is the starting model; a resumed run recomputes it from the run's base weights.
    reference_model = start.model
    if start.resume_from is not None:
        from lmforge.checkpoint import load_pretrained

        reference_model = load_pretrained(start.base_dir, dtype=torch.float32)
    reference = reference_logps(reference_model, pairs, cfg.batch_size, pad)
    val_reference = reference_logps(reference_model, val_pairs, cfg.batch_size, pad) if val_pairs else None
    del reference_model
    loader = PairLoader(pairs, reference, cfg.batch_size, pad, seed=cfg.seed)
    record_run(
        run_dir,
        "dpo",
        start,
        {"data": str(data), "dpo": {**to_mapping(options), "chat": use_chat}, "train": cfg.to_dict(), "counts": counts},
    )

    def val_batches():  # every held-out pair once, in order
        for i in range(0, len(val_pairs), cfg.batch_size):
            batch = pair_batch(val_pairs[i : i + cfg.batch_size], pad)
            batch["reference"] = val_reference[i : i + cfg.batch_size]
            yield batch

    result = train(
        start.model,
        loader,
        cfg,
        run_dir,
        objective=dpo_objective(beta, loss_type),
        val_batches=val_batches if val_pairs else None,
        tokenizer_dir=start.base_dir,
        resume_from=start.resume_from,
        progress=progress,
        save_model=checkpoint_writer(start),
        parallel=parallel,
    )
    plot = None
    if is_rank0():
        plot = plot_training(read_metrics(run_dir / "metrics.jsonl"), run_dir / "loss.png", title=f"DPO ({loss_type})")
    return DPOOutput(result, run_dir, start, counts, plot)
