"""`lmforge prune`: a checkpoint -> a pruned (optionally recovered) HF-format checkpoint, with the parameter
counts and the held-out perplexity before and after."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import LmforgeError
from lmforge.eval.perplexity import MAX_EVAL_LENGTH, Perplexity, held_out_perplexity
from lmforge.model import Transformer
from lmforge.quant.prune import PruneConfig, SizeStats, prune, size_stats


@dataclass
class PruneOutcome:
    source: Path
    out: Path
    config: PruneConfig
    description: str  # what was removed
    before: SizeStats
    after: SizeStats
    perplexity: dict[str, Perplexity] = field(default_factory=dict)  # "dense", "pruned", "recovered"
    recovery: Any | None = None  # lmforge.train.loop.TrainResult
    seconds: float = 0.0


def eval_length(model: Transformer, cfg: PruneConfig) -> int:
    return cfg.eval_length or min(model.config.max_position_embeddings, MAX_EVAL_LENGTH)


def prune_checkpoint(
    model_dir: str | Path,
    out: str | Path,
    cfg: PruneConfig,
    *,
    data: str | Path | None = None,
    eval_data: str | Path | None = None,
    recover_run: str | Path | None = None,
    progress: bool = True,
) -> PruneOutcome:
    """Load `model_dir` (a checkpoint or a run directory), prune it as `cfg` says, optionally recover on
    `data` (prepared shards, also the calibration data of activation scores), evaluate on `eval_data`, and
    write `out` atomically in the source's dtype with its tokenizer and generation config."""
    from lmforge.checkpoint import companion_files, load_pretrained, save_pretrained
    from lmforge.config import dtype_from_name
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.checkpoints import resolve_model_dir

    started = time.perf_counter()
    needs = [flag for flag, wanted in (("--recover-steps", cfg.recover_steps > 0),) if wanted]
    needs += ["--importance activation"] if cfg.importance == "activation" else []
    if needs and data is None:
        verb = "needs" if len(needs) == 1 else "need"
        raise LmforgeError(f"{' and '.join(needs)} {verb} --data: prepared shards (`lmforge prepare`).")
    if data is not None and not Path(data).is_dir():
        raise LmforgeError(f"--data {data} is not a directory written by `lmforge prepare`.")
    if eval_data is not None and not Path(eval_data).exists():
        raise LmforgeError(f"--eval-data {eval_data} does not exist; give prepared shards or a text file.")
    source = resolve_model_dir(model_dir)
    model = load_pretrained(source, dtype=torch.float32)
    stored = dtype_from_name(model.config.dtype)
    tokenizer = Tokenizer.from_pretrained(source) if (source / "tokenizer.json").is_file() else None
    length = eval_length(model, cfg)

    def evaluate(m: Transformer) -> Perplexity:
        return held_out_perplexity(m, eval_data, tokenizer, length, cfg.eval_tokens)

    perplexity: dict[str, Perplexity] = {}
    before = size_stats(model)
    if eval_data is not None:
        perplexity["dense"] = evaluate(model)
    calibration = None
    if cfg.importance == "activation":
        from lmforge.quant.recover import training_batches

        calibration = training_batches(model, data, cfg)
    result = prune(
        model,
        cfg.method,
        cfg.sparsity,
        importance=cfg.importance,
        calibration=calibration,
        calib_batches=cfg.calib_batches,
    )
    pruned = result.model
    if eval_data is not None:
        perplexity["pruned"] = evaluate(pruned)
    recovery = None
    if cfg.recover_steps > 0:
        from lmforge.quant.recover import recover

        recovery = recover(pruned, result.masks, data, cfg, recover_run, progress=progress)
        if eval_data is not None:
            perplexity["recovered"] = evaluate(pruned)
    extra = companion_files(source)
    written = save_pretrained(pruned, out, dtype=stored, extra_files=extra)
    return PruneOutcome(
        source,
        written,
        cfg,
        result.describe(),
        before,
        size_stats(pruned),
        perplexity,
        recovery,
        time.perf_counter() - started,
    )


def format_outcome(o: PruneOutcome) -> str:
    """What `lmforge prune` prints."""
    c = o.config
    how = f"{c.method}" + ("" if c.method == "2:4" else f" at sparsity {c.sparsity:g}") + f", {c.importance} scores"
    b, a = o.before, o.after
    lines = [
        f"pruned {o.source} ({how}): {o.description}",
        f"parameters: {b.params:,} -> {a.params:,} ({a.params / b.params:.1%}); non-zero {b.nonzero:,} -> "
        f"{a.nonzero:,} ({a.nonzero / b.nonzero:.1%}); projection weights {a.projection_sparsity:.1%} zero",
    ]
    if o.perplexity:
        names = list(o.perplexity)
        ppl = " -> ".join(f"{n} {o.perplexity[n].metrics()['token_perplexity']:.3f}" for n in names)
        bpb = " -> ".join(f"{o.perplexity[n].metrics()['bits_per_byte']:.3f}" for n in names)
        lines.append(f"perplexity: {ppl} (bits/byte {bpb}; {o.perplexity[names[0]].tokens:,} tokens)")
    if o.recovery is not None:
        r = o.recovery
        lines.append(f"recovery: {r.steps} steps, {r.tokens:,} tokens in {r.elapsed_s:.0f} s, loss {r.final_loss:.4f}")
    lines.append(f"wrote {o.out} (HF format) in {o.seconds:.1f} s")
    return "\n".join(lines)
