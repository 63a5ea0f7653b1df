"""Size / perplexity trade-off of lmforge's pruning methods (lmforge.quant.prune), measured on one small model.

Unless --model and --data are given, it first builds the quickstart's kind of corpus (this Python's
standard library), a byte-level BPE tokenizer and prepared shards, and pretrains a small Llama-style model
with GQA (8 query heads over 4 kv heads, so that head pruning has groups to remove) for a fixed number of
steps; everything is cached in --work. Then, for each method and sparsity, it prunes a fresh copy of the
model, scores the held-out split (lmforge.eval.perplexity, disjoint windows) and, for a few points, runs the
recovery fine-tune (lmforge.quant.recover) and scores again. A dense model fine-tuned for the same number
of steps is the fair baseline for the recovered points (the recovery is extra training too).

    python benchmarks/prune_curve.py                      # build, train, sweep, plot, append to RESULTS.md
    python benchmarks/prune_curve.py --model DIR --data DIR --no-append

Size is the count of non-zero weights in the attention and MLP projections (what pruning acts on), as a
share of the dense model's; the embedding (tied) is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SWEEPS = {  # (method, importance) -> sparsities
    ("magnitude", "magnitude"): (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
    ("magnitude", "activation"): (0.3, 0.5, 0.6, 0.7, 0.8),
    ("2:4", "magnitude"): (0.5,),
    ("2:4", "activation"): (0.5,),
    # 0.25 would leave 6 heads, which transformers' LlamaConfig refuses for hidden 128 (lmforge refuses it too)
    ("heads", "magnitude"): (0.5, 0.75),
    ("heads", "activation"): (0.5, 0.75),
    ("channels", "magnitude"): (0.25, 0.5, 0.75),
    ("channels", "activation"): (0.25, 0.5, 0.75),
}
RECOVER = (("magnitude", "activation", 0.7), ("2:4", "activation", 0.5), ("heads", "activation", 0.5))
RECOVER += (("channels", "activation", 0.5),)
MODEL = dict(hidden_size=128, num_layers=4, num_heads=8, num_kv_heads=4, head_dim=16, intermediate_size=384)


def build(work: Path, steps: int, batch: int, corpus_mb: float, vocab: int) -> tuple[Path, Path]:
    """(checkpoint, data): the stdlib corpus, tokenizer and shards, and a pretrained model (cached)."""
    from lmforge.data import prepare
    from lmforge.quickstart import stdlib_files
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.checkpoints import resolve_model_dir
    from lmforge.train.config import TrainConfig
    from lmforge.train.pretrain import pretrain

    data = work / "data"
    if not (data / "index.json").is_file():
        files = stdlib_files(corpus_mb * 1e6)
        texts = [f.read_text(encoding="utf-8", errors="replace") for f in files]
        tok = Tokenizer.train(texts, vocab, "llama3")
        prepare([str(f) for f in files], tok, data, val_fraction=0.05, seed=0, progress=False)
    run = work / f"run-{steps}x{batch}"
    if not (run / "checkpoints" / "latest").is_file():
        config = work / "model.json"
        config.write_text(
            json.dumps(
                {
                    **MODEL,
                    "vocab_size": vocab,
                    "tie_embeddings": True,
                    "rope_theta": 500000.0,
                    "max_position_embeddings": 1024,
                    "family": "llama",
                }  # fmt: skip
            )
        )
        cfg = TrainConfig(
            steps=steps, batch_size=batch, seq_len=256, lr=3e-3, warmup_steps=50, min_lr_ratio=0.05,
            eval_every=0, save_every=0, seed=0,
        )  # fmt: skip
        t0 = time.perf_counter()
        pretrain(str(config), data, run, cfg, overwrite=True)
        print(f"pretrained {steps} steps in {time.perf_counter() - t0:.0f} s", flush=True)
    return resolve_model_dir(run), data


def cpu_line() -> str:
    from lmforge.quickstart import cpu_description

    cpu = cpu_description()
    flags = ", ".join(cpu["flags"]) or "none of avx2/avx512/amx"
    amx = "" if any(f.startswith("amx") for f in cpu["flags"]) else "; no amx"
    return f"{cpu['model']}, {cpu['cores']} cores (flags {flags}{amx}), torch threads {cpu['torch_threads']}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("/tmp/lmforge-prune-curve"))
    p.add_argument("--model", type=Path, help="a checkpoint to prune instead of training one (needs --data)")
    p.add_argument("--data", type=Path, help="prepared shards: train split for recovery/calibration, val for scoring")
    p.add_argument("--steps", type=int, default=400, help="pretraining steps of the model built here")
    p.add_argument("--batch-size", type=int, default=8, help="sequences of 256 tokens per step (pretraining, recovery)")
    p.add_argument("--corpus-mb", type=float, default=4.0)
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--eval-tokens", type=int, default=40000, help="held-out tokens scored per point")
    p.add_argument("--recover-steps", type=int, default=50)
    p.add_argument("--recover-lr", type=float, default=1e-3)
    p.add_argument("--png", type=Path, default=ROOT / "benchmarks" / "results" / "prune_curve.png")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "RESULTS.md")
    p.add_argument("--no-append", action="store_true", help="print the table instead of appending it")
    args = p.parse_args()

    from lmforge.checkpoint import load_pretrained
    from lmforge.eval.perplexity import held_out_perplexity
    from lmforge.quant.prune import PruneConfig, prune, size_stats
    from lmforge.quant.recover import recover, training_batches

    started = time.perf_counter()
    if args.model is not None:
        if args.data is None:
            raise SystemExit("--model needs --data (prepared shards)")
        checkpoint, data = args.model, args.data
    else:
        args.work.mkdir(parents=True, exist_ok=True)
        checkpoint, data = build(args.work, args.steps, args.batch_size, args.corpus_mb, args.vocab)

    def fresh():
        return load_pretrained(checkpoint, dtype=torch.float32).eval()

    def score(model) -> tuple[float, float]:
        m = held_out_perplexity(model, data, max_length=256, max_tokens=args.eval_tokens).metrics()
        return m["token_perplexity"], m["bits_per_byte"]

    def recovery_cfg(method: str, sparsity: float) -> PruneConfig:
        return PruneConfig(
            method=method, sparsity=sparsity, recover_steps=args.recover_steps, recover_lr=args.recover_lr,
            recover_batch_size=args.batch_size, recover_seq_len=256, recover_dtype="float32", seed=1,
        )  # fmt: skip

    dense = fresh()
    dense_stats = size_stats(dense)
    rows = []

    def record(method, importance, sparsity, recovered, model, seconds) -> None:
        s = size_stats(model)
        ppl, bpb = score(model)
        rows.append(
            {
                "method": method,
                "importance": importance,
                "sparsity": sparsity,
                "recovered": recovered,
                "size": s.projection_nonzero / dense_stats.projection,
                "projection_nonzero": s.projection_nonzero,
                "nonzero": s.nonzero,
                "params": s.params,
                "ppl": ppl,
                "bpb": bpb,
                "seconds": seconds,
            }
        )
        tag = " +recovery" if recovered else ""
        print(f"{method:>9} {importance:>10} {sparsity:.2f}{tag}: size {rows[-1]['size']:.3f} ppl {ppl:8.3f} "
              f"bpb {bpb:.3f} ({seconds:.1f} s)", flush=True)  # fmt: skip

    record("dense", "-", 0.0, False, dense, 0.0)
    t0 = time.perf_counter()
    recover(dense, {}, data, recovery_cfg("magnitude", 0.5), progress=False)
    record("dense", "-", 0.0, True, dense, time.perf_counter() - t0)
    for (method, importance), sparsities in SWEEPS.items():
        for sparsity in sparsities:
            t0 = time.perf_counter()
            model = fresh()
            calib = (
                training_batches(model, data, recovery_cfg(method, sparsity)) if importance == "activation" else None
            )
            result = prune(model, method, sparsity, importance=importance, calibration=calib, calib_batches=8)
            record(method, importance, sparsity, False, result.model, time.perf_counter() - t0)
            if (method, importance, sparsity) in RECOVER:
                t0 = time.perf_counter()
                recover(result.model, result.masks, data, recovery_cfg(method, sparsity), progress=False)
                record(method, importance, sparsity, True, result.model, time.perf_counter() - t0)
    total = time.perf_counter() - started
    (args.work / "prune_curve.json").write_text(json.dumps(rows, indent=1) + "\n")
    plot(rows, args.png)
    table = report(rows, args, checkpoint, dense_stats, total)
    if args.no_append:
        print(table)
    else:
        with open(args.results, "a", encoding="utf-8") as f:
            f.write("\n" + table)
        print(f"appended to {args.results}; plot {args.png}")
    return 0


def plot(rows: list[dict], out: Path) -> None:
    from lmforge.atomic import replace_file

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(install matplotlib, the `plot` extra, for the PNG)")
        return
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = {"magnitude": "tab:blue", "2:4": "tab:purple", "heads": "tab:red", "channels": "tab:green"}
    for (method, importance), _ in SWEEPS.items():
        pts = sorted((r for r in rows if (r["method"], r["importance"]) == (method, importance) and not r["recovered"]),
                     key=lambda r: r["size"])  # fmt: skip
        style = "-" if importance == "magnitude" else "--"
        ax.plot([r["size"] for r in pts], [r["ppl"] for r in pts], style, marker="o", color=colors[method],
                label=f"{method} ({'weight' if importance == 'magnitude' else 'activation'} scores)")  # fmt: skip
    dense = [r for r in rows if r["method"] == "dense"]
    for r in dense:
        ax.plot(r["size"], r["ppl"], "k*" if not r["recovered"] else "kP", markersize=11,
                label="dense" + (" + same fine-tune" if r["recovered"] else ""))  # fmt: skip
    for r in (r for r in rows if r["recovered"] and r["method"] != "dense"):
        ax.plot(r["size"], r["ppl"], "P", color=colors[r["method"]], markersize=10, markeredgecolor="k")
    ax.plot([], [], "P", color="gray", markeredgecolor="k", label="after recovery fine-tune")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())  # 15, 20 rather than 1.5x10^1
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("non-zero attention/MLP weights (share of the dense model)")
    ax.set_ylabel("held-out perplexity (tokens, log scale)")
    ax.set_title("pruning a 1M-parameter stdlib model: size vs perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper center")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_file(out, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def report(rows: list[dict], args: argparse.Namespace, checkpoint: Path, dense, total: float) -> str:
    cmd = "python benchmarks/prune_curve.py" + (f" --model {args.model} --data {args.data}" if args.model else "")
    date = datetime.now(timezone.utc).strftime("%a %b %-d %H:%M UTC %Y")
    lines = [
        "## Pruning: size vs perplexity (issue 12, pruning)",
        "",
        f"One {dense.params / 1e6:.2f}M-parameter Llama-style model ({dense.projection:,} projection weights; hidden "
        f"{MODEL['hidden_size']}, {MODEL['num_layers']} layers, {MODEL['num_heads']} heads / {MODEL['num_kv_heads']} "
        f"kv heads, ffn {MODEL['intermediate_size']}, tied vocab {args.vocab}) pretrained {args.steps} steps x "
        f"{args.batch_size} x 256 tokens on this Python's standard library, pruned by each method, scored on the "
        f"held-out split ({args.eval_tokens:,} tokens, disjoint windows of 256). Recovery: {args.recover_steps} "
        f"steps x {args.batch_size} x 256 tokens in float32, lr {args.recover_lr}, zeros held; `dense + same "
        "fine-tune` gets the same steps.",
        "",
        f"Command: `{cmd}`",
        f"Date: {date}. {cpu_line()}; Python {platform.python_version()}, torch {torch.__version__}; "
        f"load average {os.getloadavg()[0]:.1f}; {total:.0f} s in all.",
        "",
        "| method | scores | sparsity | recovery | non-zero projection weights | parameters (non-zero) | perplexity "
        "| bits/byte |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['method']} | {r['importance']} | {r['sparsity']:g} | {'yes' if r['recovered'] else ''} | "
            f"{r['projection_nonzero']:,} ({r['size']:.1%}) | {r['params']:,} ({r['nonzero']:,}) | {r['ppl']:.3f} | "
            f"{r['bpb']:.3f} |"
        )
    rel = os.path.relpath(args.png, ROOT / "benchmarks")
    lines += ["", f"![size vs perplexity]({rel})", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
