"""The sweeps behind the quickstart's sizing rule (lmforge/train/sizing.py; results in docs/LOG.md).

Two measurements, kept apart because the machines are shared and wall-clock time is noisy:

- `speed`: tokens/s of each configuration's training step (the loop's: batch, forward, backward, clip,
  optimizer), measured in interleaved rounds so that all see the same contention, as the best of many step
  timings (contention only ever slows a step down, so the best step is the robust estimate). Reported with
  the matmul peak of the same dtype, i.e. as MFU, which is what carries over to a machine with another
  FLOP rate.
- `train`: held-out bits per byte after a step-bounded run of a given number of tokens. Quality at a fixed
  token count does not depend on how busy the machine was, so configurations are compared at the token
  count each would reach in the time budget (predicted tokens/s x budget).

    python benchmarks/quickstart_sweep.py data --vocab 4096
    python benchmarks/quickstart_sweep.py speed --emulate-avx2 --config base --config h192:hidden_size=192
    python benchmarks/quickstart_sweep.py train --tokens 1.4e6 --dtype float32 --config muon:optimizer=muon,lr=0.01
    python benchmarks/quickstart_sweep.py plan --flops 83e9 --dtype float32 --minutes 4.5

A configuration is NAME or NAME:key=value,...: overrides of the plan's fields (QuickstartPlan) and of
`vocab_size`, `warmup_steps`, `schedule`, `min_lr_ratio`, `weight_decay`, `muon_momentum`, `seed`.
`--emulate-avx2` reruns the command in a process whose torch uses only AVX2 kernels (bf16 matmuls then take
the slow path, as on an AVX2-only CPU); its fp32 speed is this CPU's, not an AVX2 machine's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
TRAIN_KEYS = ("vocab_size", "warmup_steps", "schedule", "min_lr_ratio", "weight_decay", "muon_momentum", "seed")
# Knobs of this harness only (not options of the library): what an experiment changes by patching.
EXTRA_KEYS = {"adam_lr_scale": 1.0}  # with Muon: multiplier of the lr of the AdamW groups (embeddings, norms)


def parse_config(spec: str, base: dict) -> tuple[str, dict]:
    """'name:k=v,k=v' -> (name, base with the overrides, each parsed as the type of its base value)."""
    name, _, rest = spec.partition(":")
    cfg = dict(base)
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if key not in cfg:
            raise SystemExit(f"unknown key {key!r} in {spec!r}; known: {', '.join(cfg)}")
        kind = type(cfg[key])
        cfg[key] = kind(float(value)) if kind is int else kind(value)
    return name, cfg


def base_config(dtype: str, flops: float, minutes: float) -> dict:
    """What the quickstart would run with this matmul peak and budget: the plan and its training knobs."""
    from lmforge.quickstart import PLAN_OVERRIDES, train_config
    from lmforge.train.sizing import plan_quickstart

    plan = plan_quickstart(flops, minutes, dtype)
    cfg = train_config(plan, dtype)
    return {
        **{k: getattr(plan, k) for k in PLAN_OVERRIDES},
        "vocab_size": 4096,
        "warmup_steps": plan.warmup_steps,
        **{k: getattr(cfg, k) for k in TRAIN_KEYS if k not in ("vocab_size", "warmup_steps")},
        **EXTRA_KEYS,
    }


def data_dir(work: Path, vocab: int) -> Path:
    """The quickstart's corpus, tokenizer and shards for `vocab` (built once, then reused)."""
    from lmforge.data import prepare
    from lmforge.quickstart import QuickstartOptions, stdlib_files
    from lmforge.tokenizer import Tokenizer

    out = work / f"data-v{vocab}"
    if (out / "index.json").is_file():
        return out
    opts = QuickstartOptions()
    files = stdlib_files(opts.max_corpus_mb * 1e6)
    texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
    t0 = time.perf_counter()
    tok = Tokenizer.train(texts, vocab, "llama3")
    print(f"tokenizer {vocab}: {time.perf_counter() - t0:.1f}s", flush=True)
    t0 = time.perf_counter()
    report = prepare([str(f) for f in files], tok, out, val_fraction=opts.val_fraction, seed=opts.seed, progress=False)
    print(f"prepare: {time.perf_counter() - t0:.1f}s, {report.bytes_per_token:.3f} bytes/token", flush=True)
    return out


def model_and_train_config(cfg: dict, data: Path, dtype: str, steps: int):
    from lmforge.quickstart import PLAN_OVERRIDES, model_config, train_config
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.sizing import QuickstartPlan

    plan = QuickstartPlan(**{k: cfg[k] for k in PLAN_OVERRIDES}, warmup_steps=cfg["warmup_steps"])
    tok = Tokenizer.from_pretrained(data / "tokenizer")
    model_cfg = model_config(plan, tok)
    train_cfg = train_config(plan, dtype, seed=cfg["seed"], minutes=None, steps=steps)
    train_cfg = dataclasses.replace(
        train_cfg,
        schedule=cfg["schedule"],
        min_lr_ratio=cfg["min_lr_ratio"],
        weight_decay=cfg["weight_decay"],
        muon_momentum=cfg["muon_momentum"],
    )
    return model_cfg, train_cfg


class Stepper:
    """One configuration's training step as the loop runs it (batch, forward, backward, clip, optimizer)."""

    def __init__(self, cfg: dict, work: Path, dtype: str) -> None:
        from lmforge import Transformer
        from lmforge.data import PackedLoader, TokenShards
        from lmforge.train.optim import build_optimizer
        from lmforge.train.perf import training_flops_per_token

        data = data_dir(work, cfg["vocab_size"])
        model_cfg, train_cfg = model_and_train_config(cfg, data, dtype, 1)
        torch.manual_seed(0)
        self.model = Transformer(model_cfg).train()
        self.optimizer = build_optimizer(self.model, train_cfg.lr, kind=train_cfg.optimizer)
        self.loader = PackedLoader(TokenShards(data, "train"), train_cfg.batch_size, train_cfg.seq_len)
        self.tokens = train_cfg.batch_size * train_cfg.seq_len
        self.flops_per_token = training_flops_per_token(model_cfg, train_cfg.seq_len)
        self.autocast = dtype == "bfloat16"
        self.times: list[float] = []

    def step(self) -> None:
        from lmforge.train.objectives import causal_lm

        t0 = time.perf_counter()
        batch = next(self.loader)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            out = causal_lm(self.model, batch)
        (out.loss_sum / out.weight).backward()
        torch.nn.utils.clip_grad_norm_(list(self.model.parameters()), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        float(out.loss_sum)  # the loop logs the loss: a sync point
        self.times.append(time.perf_counter() - t0)


def matmul_rate(dtype: torch.dtype, n: int = 1024, seconds: float = 0.3) -> float:
    """Best FLOP/s of an n^3 matmul over `seconds` (lmforge.train.perf.matmul_peak_flops, uncached)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def speed(args: argparse.Namespace, configs: list[tuple[str, dict]]) -> list[dict]:
    """Tokens/s of each configuration, measured in interleaved rounds of `--steps` steps (after 3 warm-up
    steps each) so that every configuration sees the same contention; the best step over all rounds is the
    estimate (contention only slows steps down). The matmul peak is measured in every round too."""
    steppers = [(name, cfg, Stepper(cfg, args.work, args.dtype)) for name, cfg in configs]
    for _, _, st in steppers:
        for _ in range(3):
            st.step()
        st.times.clear()
    peaks = []
    mm_dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    for _ in range(args.rounds):
        peaks.append(matmul_rate(mm_dtype))
        for _, _, st in steppers:
            for _ in range(args.steps):
                st.step()
    peak = max(peaks)
    records = []
    for name, cfg, st in steppers:
        best, median = st.tokens / min(st.times), st.tokens / statistics.median(st.times)
        records.append(
            {
                "name": name,
                "mode": "speed",
                "dtype": args.dtype,
                "isa": torch.backends.cpu.get_cpu_capability(),
                "threads": torch.get_num_threads(),
                "tokens_per_s_best": round(best),
                "tokens_per_s_median": round(median),
                "peak_flops": peak,
                "peak_flops_median": statistics.median(peaks),
                "flops_per_token": st.flops_per_token,
                "mfu_best": best * st.flops_per_token / peak,
                "params": sum(p.numel() for p in st.model.parameters()),
                "config": cfg,
            }
        )
    return records


@contextlib.contextmanager
def patched_optimizer(adam_lr_scale: float):
    """The training loop's optimizer with `lr_scale` on Muon's AdamW groups (no change when it is 1)."""
    import lmforge.train.loop as loop

    original = loop.build_optimizer

    def build(*args, **kwargs):
        optimizer = original(*args, **kwargs)
        for group in optimizer.param_groups:
            if "use_muon" in group and not group["use_muon"]:
                group["lr_scale"] = adam_lr_scale
        return optimizer

    loop.build_optimizer = build if adam_lr_scale != 1 else original
    try:
        yield
    finally:
        loop.build_optimizer = original


def train_run(args: argparse.Namespace, name: str, cfg: dict) -> dict:
    """Held-out bits per byte after ceil(tokens / (batch x seq_len)) steps (plain windows and strided)."""
    from lmforge.data import TokenShards
    from lmforge.quickstart import heldout_bpb
    from lmforge.train.perf import training_flops_per_token
    from lmforge.train.pretrain import pretrain

    data = data_dir(args.work, cfg["vocab_size"])
    model_cfg, train_cfg = model_and_train_config(cfg, data, args.dtype, 1)
    tokens = args.tokens
    if args.train_flops:  # the same compute for every configuration (at equal MFU)
        tokens = args.train_flops / training_flops_per_token(model_cfg, cfg["seq_len"])
    steps = math.ceil(tokens / (cfg["batch_size"] * cfg["seq_len"]))
    train_cfg = dataclasses.replace(train_cfg, steps=steps)
    train_cfg = dataclasses.replace(train_cfg, eval_batches=0)
    with tempfile.TemporaryDirectory() as tmp, patched_optimizer(cfg["adam_lr_scale"]):
        spec = Path(tmp) / "model.json"
        spec.write_text(json.dumps(model_cfg.to_dict()))
        t0 = time.perf_counter()
        out = pretrain(str(spec), data, Path(tmp) / "run", train_cfg, progress=False)
        seconds = time.perf_counter() - t0
    r = out.result
    strided, _ = heldout_bpb(out.model, TokenShards(data, "val"), data / "tokenizer", train_cfg.seq_len, args.dtype)
    return {
        "name": name,
        "mode": "train",
        "dtype": args.dtype,
        "tokens": r.tokens,
        "steps": r.steps,
        "val_bpb": r.val_bpb,
        "val_bpb_strided": strided,
        "final_loss": r.final_loss,
        "seconds": seconds,
        "skipped": r.skipped_steps,
        "params": sum(p.numel() for p in out.model.parameters()),
        "flops_per_token": training_flops_per_token(model_cfg, cfg["seq_len"]),
        "config": cfg,
    }


def plan_command(args: argparse.Namespace) -> None:
    from lmforge.train.sizing import plan_quickstart

    print(json.dumps(dataclasses.asdict(plan_quickstart(args.flops, args.minutes, args.dtype)), indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("mode", choices=["data", "speed", "train", "plan"])
    p.add_argument(
        "--work",
        type=Path,
        default=Path(tempfile.gettempdir()) / "lmforge-quickstart-sweep",
        help="where corpora, tokenizers and shards are cached",
    )
    p.add_argument("--config", action="append", default=[], help="NAME[:key=value,...] (repeatable)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--vocab", type=int, default=4096, help="data: vocabulary size")
    p.add_argument("--steps", type=int, default=8, help="speed: timed steps per configuration and round")
    p.add_argument("--rounds", type=int, default=6, help="speed: rounds over all configurations")
    p.add_argument("--tokens", type=float, default=1.4e6, help="train: training tokens per run")
    p.add_argument("--train-flops", type=float, default=0, help="train: training FLOPs per run instead of --tokens")
    p.add_argument("--flops", type=float, default=83e9, help="matmul FLOP/s the base configuration is planned for")
    p.add_argument("--minutes", type=float, default=4.5, help="training budget the base configuration is planned for")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--emulate-avx2", action="store_true", help="rerun in a process limited to AVX2 kernels")
    p.add_argument("--results", type=Path, default=None, help="append one JSON line per run to this file")
    args = p.parse_args()
    if args.emulate_avx2 and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        argv = [a for a in sys.argv[1:] if a != "--emulate-avx2"]
        raise SystemExit(subprocess.call([sys.executable, __file__, *argv], env={**os.environ, **AVX2_ENV}))
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.mode == "data":
        print(data_dir(args.work, args.vocab))
        return
    if args.mode == "plan":
        plan_command(args)
        return
    base = base_config(args.dtype, args.flops, args.minutes)
    configs = [parse_config(spec, base) for spec in args.config or ["base"]]
    if args.mode == "speed":
        report(args, speed(args, configs))
        return
    for name, cfg in configs:
        report(args, [train_run(args, name, cfg)])


def report(args: argparse.Namespace, records: list[dict]) -> None:
    for record in records:
        record["date"] = time.strftime("%Y-%m-%d %H:%M")
        line = json.dumps(record)
        print(line, flush=True)
        if args.results:
            with args.results.open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
