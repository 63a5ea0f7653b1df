"""Decoding speed: lmforge.generate vs transformers' generate, side by side, same weights and dtype.

Batch 1, a 512-token prompt, 128 new tokens, greedy, no early stop. Decode rate = (new tokens - 1) /
(time of the full call - time of a 1-token call), i.e. the prefill is subtracted. Runs alternate between
the two implementations. For a model large enough to be memory-bound (the qwen2.5-0.5b shape) the script
also reports the weight bandwidth achieved (bytes of weights read per token x tokens/s) against a
matrix-vector bandwidth measured in the same run.

    python benchmarks/decode.py --model quickstart     # target: >= 1.5x transformers
    python benchmarks/decode.py --model qwen2.5-0.5b   # target: >= 1.1x transformers
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

import lmforge
from lmforge import ModelConfig, Transformer
from lmforge.config import dtype_from_name


def build(name: str, dtype: torch.dtype) -> Transformer:
    if name == "quickstart":
        from lmforge.quickstart import model_config

        config = model_config()
    else:
        config = ModelConfig.from_preset(name)
    torch.manual_seed(0)
    return Transformer(config, dtype=dtype).eval()


def _best_rate(op: Callable[[], object], nbytes: int, seconds: float) -> float:
    """The highest bytes/s of `op` (which streams `nbytes`) over `seconds` of repeats, after a warm-up."""
    for _ in range(3):
        op()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        op()
        best = max(best, nbytes / (time.perf_counter() - t0))
    return best


def matvec_bandwidth(dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Bytes/s streamed by a [8192 x 8192] matrix-vector product (the shape of decode work)."""
    w = torch.randn(8192, 8192, dtype=dtype)
    x = torch.randn(8192, dtype=dtype)
    return _best_rate(lambda: w @ x, w.numel() * w.element_size(), seconds)


def read_bandwidth(seconds: float = 1.0) -> float:
    """Bytes/s of a streaming read on every thread (the sum of a 1 GiB fp32 tensor): the memory's ceiling,
    which a BLAS's matrix-vector product need not reach (MKL's fp32 one does not on AMD CPUs seen here)."""
    t = torch.ones(1 << 28)
    return _best_rate(t.sum, t.numel() * t.element_size(), seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="quickstart", help="'quickstart' or a preset name (random weights)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import transformers
    from transformers import AutoModelForCausalLM

    dtype = dtype_from_name(args.dtype)
    ours = build(args.model, dtype)
    with tempfile.TemporaryDirectory() as d:
        lmforge.save_pretrained(ours, d)
        theirs = AutoModelForCausalLM.from_pretrained(d, attn_implementation="sdpa", dtype=dtype).eval()
    theirs.generation_config.eos_token_id = None
    theirs.generation_config.pad_token_id = 0
    prompt = torch.randint(
        0, ours.config.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1)
    )

    def run_ours(n: int) -> list[int]:
        return lmforge.generate(ours, prompt[0].tolist(), max_new_tokens=n, eos_token_id=())

    @torch.no_grad()
    def run_theirs(n: int) -> list[int]:
        out = theirs.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=n,
            min_new_tokens=0,
            do_sample=False,
            num_beams=1,
        )
        return out[0, prompt.shape[1] :].tolist()

    same = run_ours(args.new_tokens) == run_theirs(args.new_tokens)  # also warms both up
    impls = {"lmforge": run_ours, "transformers": run_theirs}
    rates: dict[str, list[float]] = {k: [] for k in impls}
    prefill: dict[str, list[float]] = {k: [] for k in impls}
    for r in range(args.repeats):
        for name in list(impls) if r % 2 == 0 else list(reversed(impls)):
            t0 = time.perf_counter()
            impls[name](1)
            t_prefill = time.perf_counter() - t0
            t0 = time.perf_counter()
            impls[name](args.new_tokens)
            total = time.perf_counter() - t0
            prefill[name].append(t_prefill)
            rates[name].append((args.new_tokens - 1) / max(total - t_prefill, 1e-9))

    params = sum(p.numel() for p in ours.parameters())
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    print(
        f"model {args.model} ({params:,} params, {args.dtype}), batch 1, prompt {args.prompt_tokens}, "
        f"{args.new_tokens} new tokens, greedy; identical outputs: {same}"
    )
    print("| implementation | decode tokens/s median [min-max] | prefill s (median) |")
    print("|---|---|---|")
    for name in impls:
        r, pre = rates[name], statistics.median(prefill[name])
        print(f"| {name} | {statistics.median(r):.1f} [{min(r):.1f}-{max(r):.1f}] | {pre:.3f} |")
    ratio = statistics.median(rates["lmforge"]) / statistics.median(rates["transformers"])
    print(f"decode speed lmforge / transformers: {ratio:.2f}x")
    # Weights read per decoded token: every matrix once (a tied embedding is read by the output layer).
    weight_bytes = sum(p.numel() * p.element_size() for p in ours.parameters())
    if ours.lm_head is not None:
        weight_bytes -= ours.embed.weight.numel() * ours.embed.weight.element_size()  # lookup reads one row
    bandwidth = matvec_bandwidth(dtype)
    achieved = weight_bytes * statistics.median(rates["lmforge"])
    print(
        f"weights read per token {weight_bytes / 1e6:.1f} MB; lmforge achieves {achieved / 1e9:.1f} GB/s of "
        f"weight bandwidth vs {bandwidth / 1e9:.1f} GB/s measured for a matrix-vector product "
        f"({achieved / bandwidth:.0%})"
    )


if __name__ == "__main__":
    main()
