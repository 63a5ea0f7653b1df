"""Training throughput: lmforge's training step vs transformers' LlamaForCausalLM, side by side.

Same config (the quickstart model by default), same initial weights, same batch, same AdamW (fused, same
parameter groups), same loss code and the same dtype (fp32, or bf16 autocast). Measurement blocks alternate
between the two within one process so that machine noise hits both alike; the script reports median
tokens/s, the ratio, and MFU against this machine's measured matmul peak.

    python benchmarks/train_throughput.py [--dtype bfloat16] [--blocks 5] [--steps 6]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lmforge import ModelConfig, Transformer
from lmforge.train.optim import build_optimizer
from lmforge.train.perf import matmul_peak_flops, training_flops_per_token


def quickstart_config() -> ModelConfig:
    from lmforge.quickstart import QuickstartOptions

    o = QuickstartOptions()
    return ModelConfig(
        vocab_size=o.vocab_size,
        hidden_size=o.hidden_size,
        num_layers=o.num_layers,
        num_heads=o.num_heads,
        num_kv_heads=o.num_kv_heads,
        intermediate_size=o.intermediate_size,
        rope_theta=500000.0,
        tie_embeddings=True,
        max_position_embeddings=1024,
    )


def hf_model(config: ModelConfig, ours: Transformer) -> torch.nn.Module:
    """transformers' Llama with the same weights (via lmforge's own checkpoint writer and HF's reader)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    import lmforge

    with tempfile.TemporaryDirectory() as d:
        lmforge.save_pretrained(ours, d)
        model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa", dtype=torch.float32)
    return model.train()


def make_step(model: torch.nn.Module, is_hf: bool, batch: torch.Tensor, autocast: bool):
    optimizer = build_optimizer(model, 1e-3)
    inputs, labels = batch[:, :-1], batch[:, 1:]

    def step() -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(inputs).logits if is_hf else model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    return step


def timed(step, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        step()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--blocks", type=int, default=5, help="alternating measurement blocks per model")
    parser.add_argument("--steps", type=int, default=6, help="training steps per block")
    args = parser.parse_args()

    import transformers

    torch.manual_seed(0)
    config = quickstart_config()
    ours = Transformer(config).train()
    theirs = hf_model(config, ours)
    batch = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len + 1))
    autocast = args.dtype == "bfloat16"
    steps = {
        "lmforge": make_step(ours, False, batch, autocast),
        "transformers": make_step(theirs, True, batch, autocast),
    }
    first = {name: step() for name, step in steps.items()}  # warm-up, and the same starting loss
    for step in steps.values():
        step()
    tokens = args.batch_size * args.seq_len * args.steps
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for block in range(args.blocks):
        order = list(steps) if block % 2 == 0 else list(reversed(steps))
        for name in order:
            rates[name].append(tokens / timed(steps[name], args.steps))

    flops = training_flops_per_token(config, args.seq_len)
    peak = matmul_peak_flops(torch.bfloat16 if autocast else torch.float32)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    print(
        f"model: quickstart Llama ({sum(p.numel() for p in ours.parameters()):,} params), batch {args.batch_size} x "
        f"{args.seq_len}, {args.dtype}, fused AdamW; first losses {first['lmforge']:.6f} vs "
        f"{first['transformers']:.6f}"
    )
    print(f"matmul peak ({args.dtype}) {peak / 1e9:.0f} GFLOP/s; {flops / 1e6:.2f} MFLOP per token")
    print("| implementation | tokens/s median [min-max] | MFU |")
    print("|---|---|---|")
    for name, r in rates.items():
        med = statistics.median(r)
        print(f"| {name} | {med:,.0f} [{min(r):,.0f}-{max(r):,.0f}] | {med * flops / peak:.1%} |")
    ratio = statistics.median(rates["lmforge"]) / statistics.median(rates["transformers"])
    print(f"lmforge / transformers tokens/s: {ratio:.2f}x (target >= 1.2x: {'met' if ratio >= 1.2 else 'MISSED'})")


if __name__ == "__main__":
    main()
