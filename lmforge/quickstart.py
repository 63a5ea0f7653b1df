"""`lmforge quickstart`: corpus -> tokenizer -> shards -> a small Llama-3-style model -> evaluation -> samples.

Everything runs offline on data every machine has: the running Python's own standard-library source.
The model and its training are sized to this machine: the precision probe picks the dtype, the matmul peak
is measured in it, and the sizing rule (lmforge.train.sizing) turns that speed and the time budget into a
model shape, batch, learning rate and optimizer. The model is judged by bits per byte on held-out files,
next to a unigram model of the same tokens, to gzip -9 and xz -9e on exactly the same text, and to xz
given the tail of the training text as context (a compressor that has seen the training data too).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import lzma
import math
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmforge.atomic import write_file
from lmforge.config import ModelConfig
from lmforge.data import TokenShards, prepare
from lmforge.errors import LmforgeError
from lmforge.finetune.docstrings import DocstringTask, build_task
from lmforge.generate.api import generate
from lmforge.options import option
from lmforge.plots import plot_bars
from lmforge.runtime import DTYPE_CHOICES, DTYPE_HELP
from lmforge.tokenizer import Tokenizer
from lmforge.train.config import TrainConfig
from lmforge.train.perf import measured_training_rate
from lmforge.train.pretrain import pretrain
from lmforge.train.sizing import (
    AVX2_REFERENCE_FLOPS,
    BATCH_SIZE,
    LADDER,
    SEQ_LEN,
    QuickstartPlan,
    Rung,
    plan_from_rates,
    plan_quickstart,
)

# Directories of the standard library that are tests, tools or vendored packages rather than library code.
_SKIP_PARTS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__", "lib2to3", "turtledemo"}
PROMPTS = ("def fibonacci(n):", "import os\n\n\ndef ", "class Stack:\n    def __init__(self", "    for i in range(")
XZ_CONTEXT_BYTES = 8_000_000  # xz -9e's 64 MiB dictionary sees all of it
_XZ = dict(preset=9 | lzma.PRESET_EXTREME)
OPTIMIZER_CHOICES = ("auto", "adamw", "muon")
# Fields of QuickstartOptions that override the plan when set (0 / "auto": the plan's value).
PLAN_OVERRIDES = (
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "intermediate_size",
    "seq_len",
    "batch_size",
    "lr",
    "optimizer",
)


@dataclass
class QuickstartOptions:
    out: Path = option(Path("lmforge-quickstart"), "run directory")
    overwrite: bool = option(False, "replace a quickstart run already in --out")
    minutes: float = option(
        4.5, "training budget in minutes; corpus, tokenizer, evaluation and samples add about half a minute"
    )
    steps: int = option(0, "train this many steps instead (reproducible on any machine); 0: --minutes decides")
    vocab_size: int = option(0, "byte-level BPE vocabulary trained on the corpus; 0: the plan's")
    max_corpus_mb: float = option(12.0, "megabytes of standard-library source to read")
    val_fraction: float = option(0.02, "share of the files held out for evaluation")
    seed: int = option(0, "seed of the split, the initialisation, the data order and the samples")
    hidden_size: int = option(0, "0: sized by the plan (lmforge.train.sizing) from the measured speed and budget")
    num_layers: int = option(0, "0: the plan's")
    num_heads: int = option(0, "0: the plan's")
    num_kv_heads: int = option(0, "0: the plan's")
    intermediate_size: int = option(0, "0: the plan's")
    seq_len: int = option(0, "0: the plan's")
    batch_size: int = option(0, "0: the plan's")
    lr: float = option(0.0, "peak learning rate; 0: the plan's")
    optimizer: str = option(
        "auto",
        "auto (the plan's), adamw, or muon (Muon for hidden matrices, AdamW for the rest)",
        choices=OPTIMIZER_CHOICES,
    )
    dtype: str = option("auto", "compute precision: " + DTYPE_HELP, choices=DTYPE_CHOICES)
    max_new_tokens: int = option(60, "tokens per sample")
    progress: bool = option(True, "progress bars and stage lines")
    stages: tuple[str, ...] = option(("pretrain",), "pretrain, optionally then sft and dpo (the fine-tuning demo)")
    sft_minutes: float = option(1.5, "SFT budget of the fine-tuning demo")
    dpo_minutes: float = option(1.0, "DPO budget of the fine-tuning demo")


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
    xz_context_bpb: float = float("nan")
    val_bpb_nonoverlapping: float = float("nan")  # the training loop's evaluation: windows side by side
    dtype: str = "float32"
    peak_flops: float = 0.0  # measured matmul FLOP/s in `dtype`
    plan: dict[str, Any] = field(default_factory=dict)
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
    return len(gzip.compress(text, 9)) * 8 / n, xz_size(text) * 8 / n


def xz_size(data: bytes) -> int:
    return len(lzma.compress(data, **_XZ))


def xz_context_bpb(context: bytes, text: bytes) -> float:
    """Bits per byte xz -9e spends on `text` after having seen `context`:
    (size(context + text) - size(context)) * 8 / len(text)."""
    return (xz_size(context + text) - xz_size(context)) * 8 / len(text)


def training_tail(data_dir: Path, tok: Tokenizer, max_bytes: int = XZ_CONTEXT_BYTES) -> bytes:
    """The last `max_bytes` of the training split's text, decoded from its shards (exactly the text the model
    trained on; documents joined by newlines, as in val.txt)."""
    train = TokenShards(data_dir, "train")
    # Enough tokens for max_bytes at the split's mean bytes per token, with a margin for a denser tail.
    count = min(train.num_tokens, int(max_bytes * 1.25 * train.num_tokens / max(train.num_bytes, 1)) + 1)
    ids = train.read(train.num_tokens - count, count)
    ends = np.flatnonzero(ids == train.eos_token_id)
    docs = np.split(ids, ends + 1)
    text = "\n".join(tok.decode(d[d != train.eos_token_id].tolist()) for d in docs if d.size)
    return text.encode("utf-8")[-max_bytes:]


# The child's whole program: read the tail's length, the tail and the held-out text from stdin, print the xz
# sizes of tail and tail + text. No lmforge import (that would import torch), no site packages (-I).
_XZ_CHILD = """
import lzma, os, sys
if hasattr(os, "nice"):
    os.nice(19)
data = sys.stdin.buffer.read()
n = int.from_bytes(data[:8], "little")
tail, text = data[8:8 + n], data[8 + n:]
size = lambda b: len(lzma.compress(b, preset=9 | lzma.PRESET_EXTREME))
print(size(tail), size(tail + text))
"""


class BackgroundXzContext:
    """`xz_context_bpb(context, text)` computed by a child process at the lowest CPU priority (nice 19),
    started before training: it takes the CPU time the training loop leaves idle (its single-threaded
    Python between the parallel kernels) instead of slowing its steps. A process rather than a thread: a
    low-priority thread would hold up the training loop whenever it was descheduled holding the GIL."""

    def __init__(self, context: bytes, text: bytes) -> None:
        self.text_bytes = len(text)
        self.seconds = 0.0
        self._sizes: tuple[int, int] | None = None
        self._error: str | None = None
        payload = len(context).to_bytes(8, "little") + context + text
        self._thread = threading.Thread(target=self._run, args=(payload,), daemon=True)
        self._thread.start()

    def _run(self, payload: bytes) -> None:
        t0 = time.perf_counter()
        try:  # the thread only waits on the child's pipes (no GIL held meanwhile)
            done = subprocess.run([sys.executable, "-I", "-c", _XZ_CHILD], input=payload, capture_output=True)
            if done.returncode == 0:
                tail, both = map(int, done.stdout.split())
                self._sizes = (tail, both)
            else:
                self._error = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
        except (OSError, ValueError) as e:
            self._error = [str(e)]
        self.seconds = time.perf_counter() - t0

    def result(self) -> float:
        """Bits per byte of xz on the text after the context; waits for the child if it is still running."""
        self._thread.join()
        if self._sizes is None:
            raise LmforgeError(f"the xz-with-context measurement failed ({self._error}); run with more memory free.")
        tail, both = self._sizes
        return (both - tail) * 8 / self.text_bytes


def cpu_description() -> dict[str, Any]:
    """The CPU model and the vector-extension flags that decide which precision is fast (REFERENCE.md 5)."""
    model, flags = platform.processor() or platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                wanted = ("avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
                flags = [f for f in value.split() if f in wanted]
                break
    except OSError:
        pass  # not Linux: the model name from platform is all there is
    return {
        "model": model,
        "flags": flags,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }


def unigram_bpb(train: TokenShards, val: TokenShards, val_bytes: int) -> float:
    """Cross-entropy of the validation tokens under the training split's token frequencies (add-one)."""
    counts = np.bincount(train.read(0, train.num_tokens), minlength=train.vocab_size).astype(np.float64) + 1
    logp = np.log2(counts / counts.sum())
    return float(-logp[val.read(0, val.num_tokens)].sum() / val_bytes)


def model_config(plan: QuickstartPlan | None = None, tok: Tokenizer | None = None) -> ModelConfig:
    """The quickstart's Llama-3-style model (also what the benchmarks measure): the plan's shape (by default
    the one planned for an AVX2-only CPU), special ids from `tok`."""
    plan = plan or plan_quickstart(AVX2_REFERENCE_FLOPS, QuickstartOptions().minutes, "float32")
    return ModelConfig(
        vocab_size=tok.vocab_size if tok is not None else plan.vocab_size,
        hidden_size=plan.hidden_size,
        num_layers=plan.num_layers,
        num_heads=plan.num_heads,
        num_kv_heads=plan.num_kv_heads,
        intermediate_size=plan.intermediate_size,
        rope_theta=500000.0,
        tie_embeddings=True,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id if tok is not None else None,
        eos_token_id=tuple(tok.stop_token_ids) if tok is not None else (),
        family="llama",
        source="lmforge quickstart",
    )


def train_config(
    plan: QuickstartPlan, dtype: str, seed: int = 0, minutes: float | None = None, steps: int = 1_000_000
) -> TrainConfig:
    """The pretraining run of a plan: bounded by `minutes` (the schedule then follows the clock) or `steps`."""
    return TrainConfig(
        steps=steps,
        batch_size=plan.batch_size,
        seq_len=plan.seq_len,
        lr=plan.lr,
        warmup_steps=plan.warmup_steps,
        schedule="cosine",
        min_lr_ratio=0.05,
        weight_decay=0.1,
        optimizer=plan.optimizer,
        dtype=dtype,
        seed=seed,
        eval_every=0,
        save_every=0,
        max_minutes=minutes,
        eval_batches=0,  # the whole split, in non-overlapping windows (heldout_bpb overlaps them)
    )


@torch.no_grad()
def heldout_bpb(
    model: torch.nn.Module, val: TokenShards, tokenizer_dir: Path, seq_len: int, dtype: str, batch_size: int = 32
) -> tuple[float, float]:
    """(bits per byte, nats per token) of the whole validation split, scored in windows of seq_len tokens
    that overlap by half: the first window scores all of its tokens, each later one only its last seq_len/2,
    so every token is scored once and (after the first window) with at least seq_len/2 tokens of context
    (the sliding-window evaluation of transformers' perplexity guide). xz, the baseline, sees all the text
    before each byte; non-overlapping windows would give the model ~seq_len/2 tokens on average."""
    from lmforge.runtime import autocast, model_device

    token_bytes = torch.as_tensor(Tokenizer.from_pretrained(tokenizer_dir).token_bytes(), dtype=torch.long)
    ids = torch.from_numpy(val.read(0, val.num_tokens).astype(np.int64))
    n, stride = ids.numel(), max(seq_len // 2, 1)
    if n < 2:
        raise LmforgeError("the validation split has no tokens to score; raise --val-fraction.")
    # Window starts every `stride` tokens; the window starting at s predicts stream tokens s+1 .. s+seq_len.
    starts = list(range(0, max(n - 1 - seq_len, 0) + 1, stride))
    if starts[-1] + seq_len < n - 1:
        starts.append(n - 1 - seq_len)  # one last window ending at the last token
    was_training = model.training
    model.eval()
    device = model_device(model)
    nll, nbytes, ntokens, scored_to = 0.0, 0, 0, 0
    for i in range(0, len(starts), batch_size):
        chunk = starts[i : i + batch_size]
        length = min(seq_len, n - 1)
        windows = torch.stack([ids[s : s + length + 1] for s in chunk])  # [B, T+1]
        with autocast(dtype, device):
            logits = model(windows[:, :-1].to(device))
        logp = torch.log_softmax(logits.float(), dim=-1)
        labels = windows[:, 1:].to(device)
        token_nll = -logp.gather(-1, labels[..., None])[..., 0]  # [B, T]
        for row, s in enumerate(chunk):
            first = max(scored_to - s, 0)  # label j of this window is stream token s+j+1
            nll += float(token_nll[row, first:].sum())
            nbytes += int(token_bytes[labels[row, first:].cpu()].sum())
            ntokens += labels.shape[1] - first
            scored_to = s + length
    model.train(was_training)
    return nll / math.log(2) / nbytes, nll / ntokens


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


def check_options(opts: QuickstartOptions) -> None:
    check_stages(opts.stages)
    if not opts.minutes > 0:
        raise LmforgeError(f"--minutes must be positive, got {opts.minutes}.")
    if opts.optimizer not in OPTIMIZER_CHOICES:
        raise LmforgeError(f"--optimizer must be one of {', '.join(OPTIMIZER_CHOICES)}, got {opts.optimizer!r}.")
    negative = [n for n in (*PLAN_OVERRIDES, "vocab_size", "steps") if n != "optimizer" and getattr(opts, n) < 0]
    if negative:
        raise LmforgeError(f"--{negative[0].replace('_', '-')} must be positive, or 0 for the plan's value.")


def training_rate(rung: Rung, dtype: str, vocab_size: int = 0) -> float:
    """Measured training tokens/s of `rung` in `dtype` on this machine, now."""
    return measured_training_rate(rung.config(vocab_size or None), dtype, BATCH_SIZE, SEQ_LEN, "muon")


def choose_dtype(opts: QuickstartOptions) -> tuple[str, dict[str, float]]:
    """The training dtype and the measured tokens/s of the smallest rung in each candidate. `auto` tries
    bf16 only where its matmuls are faster, then keeps it only if whole training steps are faster too:
    at these sizes the casts around the matmuls can eat the gain (docs/LOG.md)."""
    from lmforge.runtime import training_dtype

    if opts.dtype != "auto":
        return opts.dtype, {}
    candidates = ["float32"] + (["bfloat16"] if training_dtype("auto") == "bfloat16" else [])
    rates = {d: training_rate(LADDER[0], d, opts.vocab_size) for d in candidates}
    return max(rates, key=rates.__getitem__), rates


def plan_for(
    opts: QuickstartOptions, peak_flops: float, dtype: str, rates: dict[str, float] | None = None
) -> QuickstartPlan:
    """The plan for this machine, with every option the user set explicitly kept as given: sized from
    measured training rates, or (for a shape the user fixed) from the calibrated model of the peak."""
    if opts.hidden_size:
        plan = plan_quickstart(peak_flops, opts.minutes, dtype, opts.vocab_size)
    else:
        known = {LADDER[0]: rates[dtype]} if rates and dtype in rates else {}

        def rate(rung: Rung) -> float:
            if rung not in known:
                known[rung] = training_rate(rung, dtype, opts.vocab_size)
            return known[rung]

        plan = plan_from_rates(rate, opts.minutes, opts.vocab_size)
    given = {n: getattr(opts, n) for n in PLAN_OVERRIDES if getattr(opts, n) not in (0, 0.0, "auto")}
    return dataclasses.replace(plan, **given) if given else plan


# What a quickstart run writes into its directory (and all that --overwrite removes).
_RUN_ENTRIES = (
    "run",
    "data",
    "tokenizer",
    "docstrings",
    "sft",
    "dpo",
    "model_config.json",
    "report.md",
    "result.json",
    "compression.png",
)


def clear_previous_run(out: Path, overwrite: bool) -> None:
    """Refuse to start in a directory that holds a quickstart run unless `overwrite`; then remove only what a
    quickstart writes (anything else the user keeps there stays)."""
    present = [name for name in _RUN_ENTRIES if (out / name).exists()]
    if not present:
        return
    if not overwrite:
        raise LmforgeError(
            f"{out} already holds a quickstart run ({', '.join(present)}); pass --overwrite to replace it "
            "or --out to choose another directory."
        )
    for name in present:
        path = out / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def run_quickstart(opts: QuickstartOptions) -> QuickstartResult:
    from lmforge.info import count_parameters
    from lmforge.runtime import probe_precision
    from lmforge.train.perf import matmul_peak_flops

    check_options(opts)
    out = opts.out
    clear_previous_run(out, opts.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    say = print if opts.progress else (lambda *a, **k: None)

    t0 = time.perf_counter()
    dtype, rates = choose_dtype(opts)
    peak = matmul_peak_flops(torch.bfloat16 if dtype == "bfloat16" else torch.float32, seconds=0.5)
    plan = plan_for(opts, peak, dtype, rates)
    times["measure"] = time.perf_counter() - t0
    measured = ", ".join(f"{d} {r:,.0f}" for d, r in rates.items())
    how = f"{probe_precision().describe()}; training tokens/s of the smallest model: {measured}"
    how = how if opts.dtype == "auto" else f"{dtype} (as asked)"
    say(f"[0/5] this machine: {how} -> {dtype}, matmul peak {peak / 1e9:.0f} GFLOP/s -> {plan.describe()}")

    t0 = time.perf_counter()
    files = stdlib_files(opts.max_corpus_mb * 1e6)
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    say(f"[1/5] corpus: {len(files)} standard-library files ({sum(map(len, texts)) / 1e6:.1f} M characters)")
    tok = Tokenizer.train(texts, plan.vocab_size, "llama3")
    tok.save(out / "tokenizer")
    del texts
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
    val_text = (out / "data" / "val.txt").read_bytes()
    # xz -9e over 8 MB takes a while (two passes, ~4 s each on a quiet AVX-512 machine): during training.
    xz_context = BackgroundXzContext(training_tail(out / "data", tok), val_text)

    config = model_config(plan, tok)
    config_file = out / "model_config.json"
    config_file.write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    params = count_parameters(config)[0]
    say(
        f"[4/5] pretraining a {params / 1e6:.2f}M-parameter Llama-3-style model for "
        f"{f'{opts.steps} steps' if opts.steps else f'{opts.minutes:g} minutes'} "
        f"({dtype}, {plan.optimizer}, batch {plan.batch_size} x {plan.seq_len} tokens)"
    )
    if opts.steps:
        cfg = train_config(plan, dtype, opts.seed, steps=opts.steps)
    else:
        cfg = train_config(plan, dtype, opts.seed, minutes=opts.minutes)
    t0 = time.perf_counter()
    trained = pretrain(str(config_file), out / "data", out / "run", cfg, progress=opts.progress)
    times["pretrain"] = time.perf_counter() - t0
    r = trained.result

    t0 = time.perf_counter()
    train_shards, val_shards = TokenShards(out / "data", "train"), TokenShards(out / "data", "val")
    model = trained.model.eval()
    val_bpb, val_loss = heldout_bpb(model, val_shards, out / "tokenizer", plan.seq_len, dtype)
    gz, xz = compression_bpb(val_text)
    uni = unigram_bpb(train_shards, val_shards, val_shards.num_bytes)
    samples = {p: complete(model, tok, p, opts.max_new_tokens, opts.seed) for p in PROMPTS}
    times["evaluate"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    xz_ctx = xz_context.result()
    times["xz_context_wait"] = time.perf_counter() - t0
    times["xz_context"] = xz_context.seconds
    say(f"[5/5] evaluation and samples in {times['evaluate']:.1f}s")
    result = QuickstartResult(
        out,
        val_bpb,
        val_loss,
        uni,
        gz,
        xz,
        params,
        r.steps,
        r.tokens,
        xz_context_bpb=xz_ctx,
        val_bpb_nonoverlapping=r.val_bpb if r.val_bpb is not None else float("nan"),
        dtype=dtype,
        peak_flops=peak,
        plan=dataclasses.asdict(plan),
        seconds=times,
        samples=samples,
    )
    if set(opts.stages) - {"pretrain"}:
        result.stages = run_finetune_stages(opts, files, tok, trained.result.checkpoint, say, dtype)
    plot_bars(
        {"lmforge model": val_bpb, "xz -9e with context": xz_ctx, "xz -9e": xz, "gzip -9": gz, "unigram": uni},
        out / "compression.png",
        "bits per byte on held-out stdlib files (lower is better)",
        "quickstart: model vs compressors",
    )
    write_report(result, trained.plot)
    write_result_json(result)
    return result


def write_result_json(r: QuickstartResult) -> Path:
    """result.json: the numbers of the report, machine-readable (written atomically)."""
    record = {
        "val_bpb": r.val_bpb,
        "val_loss": r.val_loss,
        "val_bpb_nonoverlapping": r.val_bpb_nonoverlapping,
        "xz_bpb": r.xz_bpb,
        "xz_context_bpb": r.xz_context_bpb,
        "gzip_bpb": r.gzip_bpb,
        "unigram_bpb": r.unigram_bpb,
        "dtype": r.dtype,
        "params": r.params,
        "tokens": r.tokens,
        "steps": r.steps,
        "matmul_peak_flops": r.peak_flops,
        "matmul_peak_dtype": r.dtype,
        "plan": r.plan,
        "cpu": cpu_description(),
        "seconds": r.seconds,
        "stages": r.stages,
    }
    return write_file(r.run_dir / "result.json", json.dumps(record, indent=2) + "\n")


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
    opts: QuickstartOptions, minutes: float, batch_size: int, lr: float, warmup_steps: int, dtype: str
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
        dtype=dtype,
        seed=opts.seed,
        eval_every=0,
        save_every=0,
        max_minutes=minutes,
    )


def run_finetune_stages(
    opts: QuickstartOptions, files: list[Path], tok: Tokenizer, base: Path | None, say, dtype: str
) -> dict[str, dict[str, float]]:
    """SFT then DPO on the docstring task, each stage evaluated on held-out functions."""
    from lmforge.finetune.config import DPOConfig, SFTConfig
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
        cfg = _stage_config(opts, opts.sft_minutes, batch_size=16, lr=1e-3, warmup_steps=20, dtype=dtype)
        sft = SFTConfig(val_fraction=0.02)
        current = finetune(current, task.sft, opts.out / "sft", cfg, sft, progress=opts.progress).result.checkpoint
        results["sft"] = evaluate_stage(current, task, tok)
    if "dpo" in opts.stages:
        say(f"[8] DPO for {opts.dpo_minutes:g} minutes")
        cfg = _stage_config(opts, opts.dpo_minutes, batch_size=8, lr=1e-4, warmup_steps=10, dtype=dtype)
        options = DPOConfig(beta=1.0, val_fraction=0.02)
        current = dpo(current, task.dpo, opts.out / "dpo", cfg, options, progress=opts.progress).result.checkpoint
        results["dpo"] = evaluate_stage(current, task, tok)
    return results


def verdict(model_bpb: float, baseline_bpb: float) -> str:
    return "better" if model_bpb < baseline_bpb else "worse"


def write_report(r: QuickstartResult, loss_plot: Path | None) -> Path:
    plan = r.plan
    lines = [
        "# lmforge quickstart",
        "",
        f"A {r.params / 1e6:.2f}M-parameter Llama-3-style model trained for {r.steps} steps "
        f"({r.tokens:,} tokens, {r.seconds.get('pretrain', 0):.0f} s, {r.dtype}, {plan.get('optimizer', '?')}) "
        "on this Python's standard library.",
        f"Sized for this machine's measured {r.dtype} matmul peak of {r.peak_flops / 1e9:.0f} GFLOP/s "
        f"(lmforge.train.sizing): hidden {plan.get('hidden_size')}, {plan.get('num_layers')} layers, "
        f"batch {plan.get('batch_size')} x {plan.get('seq_len')} tokens, peak lr {plan.get('lr')}.",
        "",
        "| held-out stdlib files | bits per byte |",
        "|---|---|",
        f"| lmforge model | **{r.val_bpb:.3f}** (loss {r.val_loss:.3f} nats/token; {r.val_bpb_nonoverlapping:.3f} "
        "in windows side by side) |",
        f"| xz -9e with the training text as context | {r.xz_context_bpb:.3f} |",
        f"| xz -9e | {r.xz_bpb:.3f} |",
        f"| gzip -9 | {r.gzip_bpb:.3f} |",
        f"| unigram tokens (add-one) | {r.unigram_bpb:.3f} |",
        "",
        f"The model compresses the held-out source {verdict(r.val_bpb, r.xz_bpb)} than xz "
        f"({r.val_bpb / r.xz_bpb:.2f}x its bits) and {verdict(r.val_bpb, r.xz_context_bpb)} than xz given the "
        f"last {XZ_CONTEXT_BYTES / 1e6:.0f} MB of the training text first ({r.val_bpb / r.xz_context_bpb:.2f}x): "
        "size(tail + held-out) - size(tail), a compressor that has seen the training data too. The model is "
        "scored in windows overlapping by half, so that every token has at least half a window of context.",
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
            f"held-out bits/byte: model {r.val_bpb:.3f} | xz -9e with training context {r.xz_context_bpb:.3f} | "
            f"xz -9e {r.xz_bpb:.3f} | gzip -9 {r.gzip_bpb:.3f} | unigram {r.unigram_bpb:.3f}",
            f"({r.dtype}, {r.plan.get('optimizer', '?')}, {r.params / 1e6:.2f}M parameters, {r.tokens:,} tokens in "
            f"{r.steps} steps; matmul peak {r.peak_flops / 1e9:.0f} GFLOP/s)",
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
            f"--steps 2000 --optimizer {r.plan.get('optimizer', 'adamw')}",
            f"  lmforge tokenizer encode {r.run_dir / 'tokenizer'} 'def hello(): pass'",
        ]
    )
