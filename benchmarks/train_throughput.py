"""Training throughput: lmforge's training step vs transformers' LlamaForCausalLM, side by side.

Same config (the quickstart model by default), same initial weights, same batch, same AdamW (fused, same
parameter groups) and the same dtype (fp32, or bf16 autocast); each side computes its loss its own way
(lmforge's causal_lm objective, transformers' built-in loss). Each measurement runs in a fresh process, in
alternating order, so that each library runs as it would on its own: `lmforge pretrain` tunes the memory
allocator when training starts (lmforge.train.perf.tune_allocator), transformers does not. A second
comparison gives transformers the same allocator setting, to separate that from the rest.

    python benchmarks/train_throughput.py [--dtype bfloat16] [--repeats 3] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from lmforge import ModelConfig, Transformer
from lmforge.train.objectives import causal_lm
from lmforge.train.optim import build_optimizer
from lmforge.train.perf import matmul_peak_flops, training_flops_per_token, tune_allocator


def quickstart_config() -> ModelConfig:
    from lmforge.quickstart import model_config

    return model_config()


def make_step(model: torch.nn.Module, is_hf: bool, batch: torch.Tensor, autocast: bool):
    """One optimizer step of each library's own training path."""
    optimizer = build_optimizer(model, 1e-3)
    inputs, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if is_hf:
                loss = model(input_ids=inputs, labels=labels, shift_labels=labels).loss
            else:
                out = causal_lm(model, {"input_ids": inputs, "labels": labels})
                loss = out.loss_sum / out.weight
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def worker(impl: str, tuned: bool, args: argparse.Namespace) -> dict:
    """Measure one implementation in this process; returns tokens/s and the first loss."""
    if tuned:
        tune_allocator()
    torch.manual_seed(0)
    config = quickstart_config()
    model: torch.nn.Module = Transformer(config).train()
    if impl == "transformers":
        from transformers import AutoModelForCausalLM

        import lmforge

        with tempfile.TemporaryDirectory() as d:
            lmforge.save_pretrained(model, d)
            model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa", dtype=torch.float32).train()
    batch = torch.randint(
        0, config.vocab_size, (args.batch_size, args.seq_len + 1), generator=torch.Generator().manual_seed(1)
    )
    step = make_step(model, impl == "transformers", batch, args.dtype == "bfloat16")
    first = step()
    step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    return {
        "tokens_per_s": args.batch_size * args.seq_len * args.steps / (time.perf_counter() - t0),
        "first_loss": first,
    }


def run_worker(impl: str, tuned: bool, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        impl,
        "--dtype",
        args.dtype,
        "--batch-size",
        str(args.batch_size),
        "--seq-len",
        str(args.seq_len),
        "--steps",
        str(args.steps),
    ] + (["--tuned"] if tuned else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from lmforge.quickstart import QuickstartOptions

    defaults = QuickstartOptions()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--seq-len", type=int, default=defaults.seq_len)
    parser.add_argument("--repeats", type=int, default=3, help="processes per configuration")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps per process")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--tuned", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tuned, args)))
        return

    import transformers

    configs = {
        "lmforge": ("lmforge", True),
        "transformers": ("transformers", False),
        "transformers + lmforge's allocator setting": ("transformers", True),
    }
    results: dict[str, list[dict]] = {name: [] for name in configs}
    for r in range(args.repeats):
        for name in list(configs) if r % 2 == 0 else list(reversed(configs)):
            results[name].append(run_worker(*configs[name], args))

    config = quickstart_config()
    flops = training_flops_per_token(config, args.seq_len)
    peak = matmul_peak_flops(torch.bfloat16 if args.dtype == "bfloat16" else torch.float32)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    params = sum(p.numel() for p in Transformer(config, device="meta").parameters())
    print(
        f"model: quickstart Llama ({params:,} params), batch {args.batch_size} x {args.seq_len}, {args.dtype}, "
        f"fused AdamW, {args.steps} timed steps per process, {args.repeats} processes each"
    )
    first = {name: res[0]["first_loss"] for name, res in results.items()}
    print(f"first-step losses: {json.dumps({k: round(v, 6) for k, v in first.items()})}")
    print(f"matmul peak ({args.dtype}) {peak / 1e9:.0f} GFLOP/s; {flops / 1e6:.2f} MFLOP per token")
    print("| implementation | tokens/s median [min-max] | MFU |")
    print("|---|---|---|")
    med = {}
    for name, res in results.items():
        rates = [x["tokens_per_s"] for x in res]
        med[name] = statistics.median(rates)
        print(f"| {name} | {med[name]:,.0f} [{min(rates):,.0f}-{max(rates):,.0f}] | {med[name] * flops / peak:.1%} |")
    ratio = med["lmforge"] / med["transformers"]
    print(f"lmforge / transformers tokens/s: {ratio:.2f}x (target >= 1.2x: {'met' if ratio >= 1.2 else 'MISSED'})")
    same = med["lmforge"] / med["transformers + lmforge's allocator setting"]
    print(f"lmforge / transformers, both with the allocator setting: {same:.2f}x")


if __name__ == "__main__":
    main()
