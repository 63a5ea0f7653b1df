"""`lmforge pretrain`: a model (preset, config or checkpoint) + prepared shards -> a run directory."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint import config_from_spec, load_pretrained
from lmforge.data.loader import PackedLoader, sequential_batches
from lmforge.data.shards import TokenShards, has_split
from lmforge.errors import LmforgeError
from lmforge.model import Transformer
from lmforge.parallel.mesh import ParallelConfig
from lmforge.plots import plot_training
from lmforge.runtime import is_rank0, model_device
from lmforge.train.checkpoints import resume_point
from lmforge.train.config import TrainConfig, check_context, resolve_precision
from lmforge.train.loop import TrainResult, train
from lmforge.train.objectives import causal_lm


@dataclass
class PretrainOutput:
    result: TrainResult
    run_dir: Path
    model: Transformer
    plot: Path | None


def find_tokenizer_dir(data_dir: Path, tokenizer: str | Path | None) -> Path | None:
    """The tokenizer to copy into checkpoints: the one given, or the one `lmforge prepare` stored."""
    if tokenizer is not None:
        path = Path(tokenizer)
        if not (path / "tokenizer.json").is_file():
            raise LmforgeError(f"{path} has no tokenizer.json; pass the directory a tokenizer was saved to.")
        return path
    stored = data_dir / "tokenizer"
    return stored if (stored / "tokenizer.json").is_file() else None


def build_model(spec: str, shards: TokenShards, tokenizer_dir: Path | None, seed: int) -> Transformer:
    """Weights from a checkpoint directory, or a fresh model from a preset / config file whose vocabulary
    and special ids are adapted to the data's tokenizer."""
    path = Path(spec)
    if path.is_dir():
        model = load_pretrained(path, dtype=torch.float32)
        if model.config.vocab_size < shards.vocab_size:
            raise LmforgeError(
                f"{spec} has a vocabulary of {model.config.vocab_size} but the data uses {shards.vocab_size} "
                "token ids; prepare the data with this model's tokenizer."
            )
        return model
    config = config_from_spec(spec)
    changes: dict = {"vocab_size": shards.vocab_size, "eos_token_id": (shards.eos_token_id,)}
    if tokenizer_dir is not None:
        from lmforge.tokenizer import Tokenizer

        tok = Tokenizer.from_pretrained(tokenizer_dir)
        changes.update(
            vocab_size=tok.vocab_size,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tuple(tok.stop_token_ids) or (shards.eos_token_id,),
            pad_token_id=tok.pad_token_id if config.pad_token_id is not None else None,
        )
    for key in ("bos_token_id", "pad_token_id"):  # a preset's ids outside the new vocabulary mean nothing there
        value = changes.get(key, getattr(config, key))
        if value is not None and not 0 <= value < changes["vocab_size"]:
            changes[key] = None
    config = config.replace(dtype="float32", **changes)
    torch.manual_seed(seed)
    return Transformer(config)


def pretrain(
    model_spec: str,
    data_dir: str | Path,
    run_dir: str | Path,
    cfg: TrainConfig,
    *,
    resume: bool = False,
    overwrite: bool = False,
    tokenizer: str | Path | None = None,
    progress: bool = True,
    parallel: ParallelConfig | None = None,
) -> PretrainOutput:
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    shards = TokenShards(data_dir, "train")
    val = TokenShards(data_dir, "val") if has_split(data_dir, "val") else None
    tokenizer_dir = find_tokenizer_dir(data_dir, tokenizer)

    ckpt = resume_point(run_dir, resume, overwrite, sources=(model_spec, data_dir))
    model = (
        load_pretrained(ckpt, dtype=torch.float32)
        if ckpt is not None
        else build_model(model_spec, shards, tokenizer_dir, cfg.seed)
    )

    check_context(model, cfg)
    cfg = resolve_precision(cfg, model_device(model), announce=progress)
    token_bytes = None
    if cfg.objective == "glm":
        from lmforge.train.glm import glm_objective

        objective = glm_objective
        loader, val_batches, has_val = _glm_batches(shards, val, tokenizer_dir, cfg, model)
    else:
        objective = causal_lm
        loader = PackedLoader(shards, cfg.batch_size, cfg.seq_len, seed=cfg.seed, mask_documents=cfg.mask_documents)
        if tokenizer_dir is not None:
            from lmforge.tokenizer import Tokenizer

            token_bytes = torch.as_tensor(Tokenizer.from_pretrained(tokenizer_dir).token_bytes(), dtype=torch.long)

        def val_batches():  # a fresh pass over the validation split each time
            assert val is not None
            return sequential_batches(val, cfg.batch_size, cfg.seq_len)

        has_val = val is not None and val.num_tokens > cfg.seq_len

    rank0 = is_rank0()
    if rank0:  # under torchrun, rank 0 alone writes
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "model": model_spec,
            "data": str(data_dir),
            "tokenizer": str(tokenizer_dir) if tokenizer_dir else None,
            "train": cfg.to_dict(),
            "model_config": model.config.to_dict(),
        }
        (run_dir / "run.json").write_text(json.dumps(record, indent=2) + "\n")
    result = train(
        model,
        loader,
        cfg,
        run_dir,
        objective=objective,
        val_batches=val_batches if has_val else None,
        token_bytes=token_bytes,
        tokenizer_dir=tokenizer_dir,
        resume_from=ckpt,
        progress=progress,
        parallel=parallel,
    )
    from lmforge.plots import read_metrics

    plot = None
    if rank0:
        metrics = read_metrics(run_dir / "metrics.jsonl")
        plot = plot_training(metrics, run_dir / "loss.png", title=f"pretrain {model_spec}")
    return PretrainOutput(result, run_dir, model, plot)


def _glm_batches(
    shards: TokenShards, val: TokenShards | None, tokenizer_dir: Path | None, cfg: TrainConfig, model: Transformer
) -> tuple[Any, Callable[[], Iterator[dict[str, torch.Tensor]]], bool]:
    """GLM blank-infilling batches (lmforge.train.glm): the training loader, a fresh pass over the validation
    split (same samples every time), and whether there is one. Needs the glm4 format's special tokens.

    No bits-per-byte is reported: the loss covers only the blanked spans and their <eop>, so it is not
    comparable with the causal objective's."""
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.glm import GlmLoader, GlmTokens, sentence_end_table

    if tokenizer_dir is None:
        raise LmforgeError(
            "--objective glm needs the tokenizer (for [MASK], [gMASK], [sMASK], <sop>, <eop>): pass --tokenizer, "
            "or prepare the data with a tokenizer trained with --chat-format glm4."
        )
    tok = Tokenizer.from_pretrained(tokenizer_dir)
    glm = GlmTokens.from_tokenizer(tok)
    if model.config.rotary_dim % 4:
        raise LmforgeError(
            f"--objective glm uses 2D RoPE, which splits the rotary dims in two halves of pairs; this model's "
            f"rotary dim ({model.config.rotary_dim}) is not a multiple of 4: change head_dim."
        )
    ends = sentence_end_table(tok) if cfg.glm_variant in ("sentence", "mixed") else None
    loader = GlmLoader(
        shards, glm, cfg.batch_size, cfg.seq_len, variant=cfg.glm_variant, seed=cfg.seed, sentence_ends=ends
    )

    val_loader = None
    if val is not None:
        try:
            val_loader = GlmLoader(
                val,
                glm,
                cfg.batch_size,
                cfg.seq_len,
                variant=cfg.glm_variant,
                seed=cfg.seed,
                shuffle=False,
                sentence_ends=ends,
            )
        except LmforgeError:  # no document of two or more tokens in the validation split
            val_loader = None
    start = val_loader.state_dict() if val_loader is not None else None

    def val_batches() -> Iterator[dict[str, torch.Tensor]]:  # the same samples every time
        assert val_loader is not None and start is not None
        val_loader.load_state_dict(start)
        return val_loader.one_epoch()

    has_val = val_loader is not None
    return loader, val_batches, has_val
