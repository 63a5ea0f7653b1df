"""`lmforge quickstart`: corpus -> tokenizer -> shards -> a small Llama-3-style model -> evaluation -> samples.

Everything runs offline on data every machine has: the running Python's own standard-library source.
The model is judged by bits per byte on held-out files, next to a unigram model of the same tokens and to
what gzip -9 and xz -9e achieve on exactly the same text.
"""

from __future__ import annotations

import gzip
import lzma
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lmforge.config import ModelConfig
from lmforge.data import TokenShards, prepare
from lmforge.errors import LmforgeError
from lmforge.finetune.docstrings import DocstringTask, build_task
from lmforge.generate.api import generate
from lmforge.plots import plot_bars
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import TrainConfig
from lmforge.train.pretrain import pretrain

# Directories of the standard library that are tests, tools or vendored packages rather than library code.
_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3", "turtledemo"}
PROMPTS = ("def fibonacci(n):", "import os\n\n\ndef ", "class Stack:\n    def __init__(self", "    for i in range(")


@dataclass
class QuickstartOptions:
    out: Path = Path("lmforge-quickstart")
    minutes: float = 4.0  # training budget; corpus, tokenizer and evaluation add about a minute
    vocab_size: int = 4096
    max_corpus_mb: float = 12.0
    val_fraction: float = 0.02
    seed: int = 0
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 2  # head_dim 64: at this size fewer, wider heads trained better per minute
    num_kv_heads: int = 1
    intermediate_size: int = 384
    seq_len: int = 128  # shorter windows, more of them: better held-out bits/byte within the budget
    batch_size: int = 32
    lr: float = 3e-3
    dtype: str = "bfloat16"
    max_new_tokens: int = 60
    progress: bool = True
    stages: tuple[str, ...] = ("pretrain",)  # add "sft" and "dpo" for the fine-tuning demo
    sft_minutes: float = 1.5
    dpo_minutes: float = 1.0


@dataclass
class QuickstartResult:
    run_dir: Path
    val_bpb: float
    val_loss: float
    unigram_bpb: float
    gzip_bpb: float
    xz_bpb: float
    params: int
    steps: int
    tokens: int
    seconds: dict[str, float] = field(default_factory=dict)
    samples: dict[str, str] = field(default_factory=dict)
    stages: dict[str, dict[str, float]] = field(default_factory=dict)  # stage -> held-out docstring metrics


def stdlib_files(max_bytes: float) -> list[Path]:
    """The standard library's own .py files (no tests or vendored code), sorted, up to `max_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for f in sorted(root.rglob("*.py")):
        if _SKIP_PARTS & set(f.relative_to(root).parts):
            continue
        size = f.stat().st_size
        if total + size > max_bytes:
            continue
        files.append(f)
        total += size
    if not files:
        raise LmforgeError(f"found no Python source under {root}; is this a standard CPython installation?")
    return files


def compression_bpb(text: bytes) -> tuple[float, float]:
    """Bits per byte of gzip -9 and xz -9e on `text`."""
    n = len(text)
    return len(gzip.compress(text, 9)) * 8 / n, len(lzma.compress(text, preset=9 | lzma.PRESET_EXTREME)) * 8 / n


def unigram_bpb(train: TokenShards, val: TokenShards, val_bytes: int) -> float:
    """Cross-entropy of the validation tokens under the training split's token frequencies (add-one)."""
    counts = np.bincount(train.read(0, train.num_tokens), minlength=train.vocab_size).astype(np.float64) + 1
    logp = np.log2(counts / counts.sum())
    return float(-logp[val.read(0, val.num_tokens)].sum() / val_bytes)


def model_config(opts: QuickstartOptions | None = None, tok: Tokenizer | None = None) -> ModelConfig:
    """The quickstart's Llama-3-style model (also what the benchmarks measure); special ids from `tok`."""
    opts = opts or QuickstartOptions()
    return ModelConfig(
        vocab_size=tok.vocab_size if tok is not None else opts.vocab_size,
        hidden_size=opts.hidden_size,
        num_layers=opts.num_layers,
        num_heads=opts.num_heads,
        num_kv_heads=opts.num_kv_heads,
        intermediate_size=opts.intermediate_size,
        rope_theta=500000.0,
        tie_embeddings=True,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id if tok is not None else None,
        eos_token_id=tuple(tok.stop_token_ids) if tok is not None else (),
        family="llama",
        source="lmforge quickstart",
    )


def complete(model: torch.nn.Module, tok: Tokenizer, prompt: str, max_new_tokens: int, seed: int) -> str:
    ids = tok.encode(prompt, add_special_tokens=True)  # BOS first, as in training
    stops = tok.stop_token_ids
    out = generate(
        model,
        ids,
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=0.8,
        top_k=50,
        seed=seed,
        eos_token_id=stops,
    )
    return prompt + tok.decode([t for t in out if t not in stops])


def run_quickstart(opts: QuickstartOptions) -> QuickstartResult:
    check_stages(opts.stages)
    out = opts.out
    if (out / "checkpoints").exists():
        raise LmforgeError(f"{out} already holds a quickstart run; pass --out to choose another directory.")
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    say = print if opts.progress else (lambda *a, **k: None)

    t0 = time.perf_counter()
    files = stdlib_files(opts.max_corpus_mb * 1e6)
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    say(f"[1/5] corpus: {len(files)} standard-library files ({sum(map(len, texts)) / 1e6:.1f} M characters)")
    tok = Tokenizer.train(texts, opts.vocab_size, "llama3")
    tok.save(out / "tokenizer")
    times["tokenizer"] = time.perf_counter() - t0
    say(f"[2/5] tokenizer: {tok.vocab_size} byte-level BPE tokens in {times['tokenizer']:.1f}s -> {out / 'tokenizer'}")

    t0 = time.perf_counter()
    report = prepare(
        [str(f) for f in files], tok, out / "data", val_fraction=opts.val_fraction, seed=opts.seed, progress=False
    )
    times["prepare"] = time.perf_counter() - t0
    say(
        f"[3/5] data: {report.splits['train'].tokens:,} train / {report.splits['val'].tokens:,} validation tokens "
        f"({report.bytes_per_token:.2f} bytes/token) -> {out / 'data'}"
    )

    config = model_config(opts, tok)
    config_file = out / "model_config.json"
    import json

    config_file.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    from lmforge.info import count_parameters

    params = count_parameters(config)[0]
    say(
        f"[4/5] pretraining a {params / 1e6:.2f}M-parameter Llama-3-style model for {opts.minutes:g} minutes "
        f"({opts.dtype}, batch {opts.batch_size} x {opts.seq_len} tokens)"
    )
    cfg = TrainConfig(
        steps=1_000_000,
        batch_size=opts.batch_size,
        seq_len=opts.seq_len,
        lr=opts.lr,
        warmup_steps=30,
        schedule="cosine",
        min_lr_ratio=0.05,
        weight_decay=0.1,
        dtype=opts.dtype,
        seed=opts.seed,
        eval_every=0,
        save_every=0,
        max_minutes=opts.minutes,
        eval_batches=0,
    )
    t0 = time.perf_counter()
    trained = pretrain(str(config_file), out / "data", out / "run", cfg, progress=opts.progress)
    times["pretrain"] = time.perf_counter() - t0
    r = trained.result
    if r.val_bpb is None or r.val_loss is None:
        raise LmforgeError("the validation split was too small to evaluate; raise --val-fraction.")

    train_shards, val_shards = TokenShards(out / "data", "train"), TokenShards(out / "data", "val")
    val_text = (out / "data" / "val.txt").read_bytes()
    gz, xz = compression_bpb(val_text)
    uni = unigram_bpb(train_shards, val_shards, val_shards.num_bytes)

    model = trained.model.eval()
    samples = {p: complete(model, tok, p, opts.max_new_tokens, opts.seed) for p in PROMPTS}
    say("[5/5] evaluation and samples")
    result = QuickstartResult(out, r.val_bpb, r.val_loss, uni, gz, xz, params, r.steps, r.tokens, times, samples)
    if set(opts.stages) - {"pretrain"}:
        result.stages = run_finetune_stages(opts, files, tok, trained.result.checkpoint, say)
    plot_bars(
        {"lmforge model": r.val_bpb, "xz -9e": xz, "gzip -9": gz, "unigram": uni},
        out / "compression.png",
        "bits per byte on held-out stdlib files (lower is better)",
        "quickstart: model vs compressors",
    )
    write_report(result, trained.plot)
    return result


STAGES = ("pretrain", "sft", "dpo")


def check_stages(stages: tuple[str, ...]) -> None:
    if not stages or stages[0] != "pretrain" or any(s not in STAGES for s in stages) or len(set(stages)) != len(stages):
        raise LmforgeError(f"--stages must start with pretrain and may add sft and dpo in that order, got {stages}.")
    if list(stages) != [s for s in STAGES if s in stages]:
        raise LmforgeError("--stages must keep the order pretrain, sft, dpo.")


def evaluate_stage(checkpoint: Path, task: DocstringTask, tok: Tokenizer) -> dict[str, float]:
    """ROUGE-L of generated one-line summaries and preference accuracy (right summary vs another) on the
    held-out functions, through `lmforge eval`'s tasks."""
    from lmforge.checkpoint import load_pretrained
    from lmforge.eval.run import EvalSettings, run_task

    model = load_pretrained(checkpoint)
    settings = EvalSettings(batch_size=16, max_new_tokens=24, progress=False)
    gen = run_task(model, tok, str(task.eval_generation), settings)
    pref = run_task(model, tok, str(task.eval_preference), settings)
    return {
        "rouge_l": gen.metrics["rouge_l"],
        "exact_match": gen.metrics["exact_match"],
        "preference_accuracy": pref.metrics["acc"],
    }


def _stage_config(
    opts: QuickstartOptions, minutes: float, batch_size: int, lr: float, warmup_steps: int
) -> TrainConfig:
    """A fine-tuning stage: time-bounded, cosine to 10%, no weight decay, sequences of 192 tokens."""
    return TrainConfig(
        steps=1_000_000,
        batch_size=batch_size,
        seq_len=192,
        lr=lr,
        warmup_steps=warmup_steps,
        schedule="cosine",
        min_lr_ratio=0.1,
        weight_decay=0.0,
        dtype=opts.dtype,
        seed=opts.seed,
        eval_every=0,
        save_every=0,
        max_minutes=minutes,
    )


def run_finetune_stages(
    opts: QuickstartOptions, files: list[Path], tok: Tokenizer, base: Path | None, say
) -> dict[str, dict[str, float]]:
    """SFT then DPO on the docstring task, each stage evaluated on held-out functions."""
    from lmforge.finetune.dpo import dpo
    from lmforge.finetune.sft import finetune

    assert base is not None
    task = build_task(files, tok, opts.out / "docstrings", max_train=6000, max_eval=400, seed=opts.seed)
    say(
        f"[6] docstring task: {task.train_functions} training / {task.held_out_functions} held-out functions "
        f"-> {opts.out / 'docstrings'}"
    )
    results = {"pretrain": evaluate_stage(base, task, tok)}
    current = base
    if "sft" in opts.stages:
        say(f"[7] SFT for {opts.sft_minutes:g} minutes")
        cfg = _stage_config(opts, opts.sft_minutes, batch_size=16, lr=1e-3, warmup_steps=20)
        current = finetune(
            current, task.sft, opts.out / "sft", cfg, val_fraction=0.02, progress=opts.progress
        ).result.checkpoint
        results["sft"] = evaluate_stage(current, task, tok)
    if "dpo" in opts.stages:
        say(f"[8] DPO for {opts.dpo_minutes:g} minutes")
        cfg = _stage_config(opts, opts.dpo_minutes, batch_size=8, lr=1e-4, warmup_steps=10)
        current = dpo(
            current, task.dpo, opts.out / "dpo", cfg, beta=1.0, val_fraction=0.02, progress=opts.progress
        ).result.checkpoint
        results["dpo"] = evaluate_stage(current, task, tok)
    return results


def write_report(r: QuickstartResult, loss_plot: Path | None) -> Path:
    verdict = "better" if r.val_bpb < r.xz_bpb else "worse"
    lines = [
        "# lmforge quickstart",
        "",
        f"A {r.params / 1e6:.2f}M-parameter Llama-3-style model trained for {r.steps} steps "
        f"({r.tokens:,} tokens, {r.seconds.get('pretrain', 0):.0f} s) on this Python's standard library.",
        "",
        "| held-out stdlib files | bits per byte |",
        "|---|---|",
        f"| lmforge model | **{r.val_bpb:.3f}** (loss {r.val_loss:.3f} nats/token) |",
        f"| xz -9e | {r.xz_bpb:.3f} |",
        f"| gzip -9 | {r.gzip_bpb:.3f} |",
        f"| unigram tokens (add-one) | {r.unigram_bpb:.3f} |",
        "",
        f"The model compresses the held-out source {verdict} than xz ({r.val_bpb / r.xz_bpb:.2f}x its bits).",
        "",
        "![loss](run/loss.png)" if loss_plot else "(install matplotlib for loss.png)",
        "![compression](compression.png)" if loss_plot else "",
        "",
        "## Samples (temperature 0.8, top-k 50)",
        "",
    ]
    for prompt, text in r.samples.items():
        lines += [f"Prompt `{prompt!r}`:", "", "```python", text, "```", ""]
    if r.stages:
        lines += [
            "## Fine-tuning stages: one-line summaries of held-out standard-library functions",
            "",
            "| stage | ROUGE-L | exact match | preference accuracy (right summary vs another) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {stage} | {m['rouge_l']:.3f} | {m['exact_match']:.3f} | {m['preference_accuracy']:.3f} |"
            for stage, m in r.stages.items()
        ]
        lines.append("")
    path = r.run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def summary(r: QuickstartResult) -> str:
    ckpt = r.run_dir / "run"
    first = next(iter(r.samples.values()))
    return "\n".join(
        [
            "",
            f"held-out bits/byte: model {r.val_bpb:.3f} | xz -9e {r.xz_bpb:.3f} | gzip -9 {r.gzip_bpb:.3f} | "
            f"unigram {r.unigram_bpb:.3f}",
            *[
                f"{stage}: held-out docstring ROUGE-L {m['rouge_l']:.3f}, preference accuracy "
                f"{m['preference_accuracy']:.3f}"
                for stage, m in r.stages.items()
            ],
            f"sample:\n{first}",
            "",
            f"report: {r.run_dir / 'report.md'}   plots: {ckpt / 'loss.png'}, {r.run_dir / 'compression.png'}",
            f"model (HF format, loads in transformers): {ckpt}/checkpoints/",
            "next:",
            f"  lmforge info {r.run_dir / 'model_config.json'}",
            f"  lmforge pretrain --model {r.run_dir / 'model_config.json'} --data {r.run_dir / 'data'} --out my-run "
            "--steps 2000 --dtype bfloat16",
            f"  lmforge tokenizer encode {r.run_dir / 'tokenizer'} 'def hello(): pass'",
        ]
    )
