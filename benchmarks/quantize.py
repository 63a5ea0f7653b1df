"""Weight-only int8 / int4 (lmforge.quantize): decode speed against fp32 and bf16, and the perplexity cost.

Speed: the qwen2.5-0.5b shape (random weights; speed does not depend on them), batch 1, a 128-token
prompt, greedy, through lmforge.generate (the engine, with its decode thread split). Decode rate =
(new tokens - 1) / the time from the first streamed token to the last (the prefill is not in it); prefill
rate = prompt tokens / the time to the first streamed token.
Variants alternate within each repeat. The
weight bandwidth achieved (bytes of weights read per token x tokens/s) is reported against a fp32
matrix-vector product and against a streaming read, both measured in the same run (benchmarks/decode.py's
probes): where the fp32 product falls well short of the read, fp32 decode is bound by the BLAS, not the
memory, and the ratios to fp32 flatter the quantized layers.

Perplexity: a small model trained on the standard library (benchmarks/prune_curve.py's model and data,
cached in --work) or --model/--data; held-out split scored in disjoint windows, fp32 against each variant.

    python benchmarks/quantize.py             # both parts; --record appends the tables to RESULTS.md
    python benchmarks/quantize.py --skip-speed --model DIR --data DIR
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from decode import matvec_bandwidth, read_bandwidth  # noqa: E402
from prune_curve import cpu_line  # noqa: E402

import lmforge  # noqa: E402
from lmforge import ModelConfig, Transformer  # noqa: E402
from lmforge.quant.layers import Int4Linear, Int8Linear, QuantLinear  # noqa: E402
from lmforge.quant.quantize import quantize  # noqa: E402

VARIANTS = {  # name -> (dtype of the float parts, quantize kwargs or None)
    "fp32": (torch.float32, None),
    "bf16": (torch.bfloat16, None),
    "int8": (torch.float32, {"method": "int8"}),
    "int8 W8A8": (torch.float32, {"method": "int8", "act_dtype": "int8"}),
    "int4 g32": (torch.float32, {"method": "int4", "group_size": 32}),
    "int4 g128": (torch.float32, {"method": "int4", "group_size": 128}),
}


def variant(config: ModelConfig, name: str) -> tuple[Transformer, str]:
    dtype, q = VARIANTS[name]
    torch.manual_seed(0)
    model = Transformer(config, dtype=dtype).eval()
    note = str(quantize(model, **q)) if q else ""
    return model, note


def bytes_per_token(model: Transformer) -> int:
    """Bytes of weights one decode step reads: every matrix once, the embedding table not (a lookup reads one
    row) unless it is the output head too."""
    total = sum(m.weight_bytes() for m in model.modules() if isinstance(m, QuantLinear))
    quantized = {id(p) for m in model.modules() if isinstance(m, QuantLinear) for p in m.parameters()}
    for name, p in model.named_parameters():
        if id(p) in quantized or (name == "embed.weight" and model.lm_head is not None):
            continue
        total += p.numel() * p.element_size()
    return total


def speed(args: argparse.Namespace) -> list[str]:
    config = ModelConfig.from_preset(args.preset)
    prompt = torch.randint(0, config.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1))
    models, notes = {}, {}
    for name in VARIANTS:
        models[name], notes[name] = variant(config, name)
        print(f"built {name} {notes[name]}", flush=True)

    def rates_of(name: str, n: int) -> tuple[float, float]:
        """Prompt tokens/s (the call to the first streamed token: the prefill) and decode tokens/s (the first
        streamed token to the last)."""
        start = time.perf_counter()
        times = [time.perf_counter() for _ in lmforge.generate_stream(models[name], prompt.tolist(),
                                                                      max_new_tokens=n, eos_token_id=())]  # fmt: skip
        return len(prompt) / (times[0] - start), (n - 1) / max(times[-1] - times[0], 1e-9)

    rates: dict[str, list[float]] = {name: [] for name in models}
    prefill: dict[str, list[float]] = {name: [] for name in models}
    for name in models:
        rates_of(name, 4)  # warm-up: kernels, layouts
    for r in range(args.repeats):
        order = list(models) if r % 2 == 0 else list(reversed(models))
        for name in order:
            p, d = rates_of(name, args.new_tokens)
            prefill[name].append(p)
            rates[name].append(d)
            print(f"  repeat {r + 1}: {name} prefill {p:.0f} tokens/s, decode {d:.1f} tokens/s", flush=True)
    bandwidth, ceiling = matvec_bandwidth(torch.float32), read_bandwidth()
    base = statistics.median(rates["fp32"])
    lines = [
        f"`python benchmarks/quantize.py` on {date.today()}, {cpu_line()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; {args.preset} shape (random weights), prompt {args.prompt_tokens}, "
        f"{args.new_tokens} new tokens, greedy, median of {args.repeats}; fp32 matrix-vector probe "
        f"{bandwidth / 1e9:.1f} GB/s, streaming read (sum) {ceiling / 1e9:.1f} GB/s.",
        "",
        "| variant | MB read per token | decode tokens/s median [min-max] | vs fp32 | GB/s of weights "
        "| prefill tokens/s median |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rates.items():
        mb = bytes_per_token(models[name]) / 1e6
        med = statistics.median(r)
        lines.append(
            f"| {name} | {mb:.0f} | {med:.1f} [{min(r):.1f}-{max(r):.1f}] | {med / base:.2f}x | {mb * med / 1e3:.1f} "
            f"| {statistics.median(prefill[name]):.0f} |"
        )
    notes_text = [f"- {n}: {notes[n]}" for n in models if notes[n]]
    return [*lines, "", *notes_text]


def perplexity(args: argparse.Namespace) -> list[str]:
    from lmforge.eval.perplexity import held_out_perplexity

    if args.model and args.data:
        checkpoint, data = Path(args.model), Path(args.data)
    else:
        from prune_curve import build

        checkpoint, data = build(Path(args.work), args.train_steps, 8, 4.0, 2048)  # prune_curve.py's defaults
    rows = []
    for name in ("fp32", "int8", "int8 W8A8", "int4 g32", "int4 g128"):
        model = lmforge.load_pretrained(checkpoint, dtype=torch.float32)
        q = VARIANTS[name][1]
        if q:
            quantize(model, **q)
        m = held_out_perplexity(model, data, max_length=256, max_tokens=args.eval_tokens).metrics()  # trained on 256
        rows.append((name, m["token_perplexity"], m["bits_per_byte"]))
        print(f"  {name}: perplexity {m['token_perplexity']:.4f}", flush=True)
    base = rows[0][1]
    params = sum(p.numel() for p in lmforge.load_pretrained(checkpoint).parameters())
    lines = [
        f"Perplexity on held-out stdlib text: {checkpoint} ({params / 1e6:.2f}M parameters, trained by "
        "benchmarks/prune_curve.py's recipe), disjoint windows of 256 tokens (its training length).",
        "",
        "| variant | perplexity | change | bits per byte |",
        "|---|---|---|---|",
        *[f"| {n} | {p:.4f} | {p / base - 1:+.2%} | {b:.4f} |" for n, p, b in rows],
    ]
    return lines


def kernels(args: argparse.Namespace) -> list[str]:
    """Each product kernel alone on one gate_proj-sized matrix of --preset, 24 of them cycled so that their
    weights are out of cache as in a decode step: one row (decode) and --prompt-tokens rows (prefill)."""
    from lmforge.quant.int8_product import float_product

    config = ModelConfig.from_preset(args.preset)
    n, k, count = config.intermediate_size, config.hidden_size, 24
    torch.manual_seed(0)
    linears = [torch.nn.Linear(k, n, bias=False) for _ in range(count)]

    def best_us(op) -> float:  # op(i) multiplies with matrix i
        with torch.inference_mode():
            for i in range(count):
                op(i)
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                for i in range(count):
                    op(i)
                best = min(best, time.perf_counter() - t0)
        return best / count * 1e6

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(1, k, dtype=dtype)
        ws = [m.weight.detach().to(dtype) for m in linears]
        rows.append(
            (
                f"{str(dtype)[6:]} dense",
                best_us(lambda i, x=x, ws=ws: torch.nn.functional.linear(x, ws[i])),
                n * k * x.element_size(),
            )
        )
    layers = {
        "int8 W8A8 (FBGEMM)": [Int8Linear.from_linear(m, torch.int8) for m in linears],
        "int8, bf16 products": [Int8Linear.from_linear(m, torch.bfloat16) for m in linears],
        "int8, fp32 products": [Int8Linear.from_linear(m, torch.float32) for m in linears],
        "int4 g32, bf16 products": [Int4Linear.from_linear(m, torch.bfloat16, 32) for m in linears],
        "int4 g32, fp32 products": [Int4Linear.from_linear(m, torch.float32, 32) for m in linears],
    }
    for name, qs in layers.items():
        x = torch.randn(1, k, dtype=qs[0].compute_dtype)
        rows.append((name, best_us(lambda i, x=x, qs=qs: qs[i](x)), qs[0].weight_bytes()))
    lines = [
        f"Kernels alone (`--kernels`), {n}x{k} matrices ({args.preset}'s gate_proj), {count} cycled, "
        f"{torch.get_num_threads()} threads, best of 3:",
        "",
        "| product, one row | us | GB/s of its weights |",
        "|---|---|---|",
        *[f"| {name} | {us:.0f} | {nbytes / us / 1e3:.1f} |" for name, us, nbytes in rows],
        "",
    ]
    m = args.prompt_tokens
    a = torch.randint(0, 128, (m, k), dtype=torch.int8)
    qw = [layer.qweight for layer in layers["int8 W8A8 (FBGEMM)"]]
    lines += [
        f"W8A8's exact int32 product of {m} prompt rows (lmforge/quant/int8_product.py): torch._int_mm "
        f"{best_us(lambda i: torch._int_mm(a, qw[i].t())) / 1e3:.1f} ms, chunked fp32 GEMMs "
        f"{best_us(lambda i: float_product(a, qw[i])) / 1e3:.1f} ms per matrix.",
    ]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="qwen2.5-0.5b")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", help="a trained checkpoint for the perplexity part (default: build one)")
    p.add_argument("--data", help="its prepared shards (the val split is scored)")
    p.add_argument("--work", default="/tmp/lmforge-prune-curve", help="cache of the built model and data")
    p.add_argument("--train-steps", type=int, default=400)
    p.add_argument("--eval-tokens", type=int, default=40000, help="held-out tokens scored per variant")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-perplexity", action="store_true")
    p.add_argument("--kernels", action="store_true", help="also time each product kernel alone")
    p.add_argument("--record", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    args = p.parse_args()
    out = ["", "## Weight-only quantization (benchmarks/quantize.py)", ""]
    if args.kernels:
        out += kernels(args) + [""]
    if not args.skip_speed:
        out += speed(args) + [""]
    if not args.skip_perplexity:
        out += perplexity(args) + [""]
    text = "\n".join(out)
    print(text)
    if args.record:
        with open(ROOT / "RESULTS.md", "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
