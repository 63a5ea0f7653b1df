"""Speculative decoding: speed-up and acceptance rate against greedy decoding with the target alone.

Target: a random model with a preset's shape (qwen2.5-0.5b by default, bf16). Draft: the target's own first
`--draft-layers` layers with its embedding, final norm and head (a "layer-skip" draft that needs no second
training run). With plain random weights every layer changes the prediction and such a draft almost never
agrees (0% acceptance measured), so the target's sub-layer output projections are scaled by
`--residual-scale`: later layers then refine rather than overturn the early ones' prediction, as in trained
models where early exits often agree. The acceptance rate is therefore a property of this setup, not of a
trained pair; the speed-up it buys shows what the mechanism costs and saves. Both runs must produce
identical tokens.

    python benchmarks/speculative.py [--preset qwen2.5-0.5b] [--draft-layers 4] [--k 4] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import time

import torch

import lmforge
from lmforge import ModelConfig, Transformer
from lmforge.generate.speculative import speculative_generate


def layer_skip_draft(target: Transformer, layers: int) -> Transformer:
    config = target.config.replace(num_layers=layers)
    draft = Transformer(config, device="meta")
    state = {
        k: v for k, v in target.state_dict().items() if not k.startswith("layers.") or int(k.split(".")[1]) < layers
    }
    draft.load_state_dict(state, assign=True)
    return draft.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--draft-layers", type=int, default=4)
    parser.add_argument("--k", type=int, default=4, help="draft tokens per target pass")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--residual-scale", type=float, default=0.1, help="scale of o_proj and down_proj weights")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    target = Transformer(ModelConfig.from_preset(args.preset), dtype=dtype).eval()
    with torch.no_grad():
        for block in target.layers:
            block.attn.o_proj.weight.mul_(args.residual_scale)
            block.mlp.down_proj.weight.mul_(args.residual_scale)
    draft = layer_skip_draft(target, args.draft_layers)
    prompt = torch.randint(
        0, target.config.vocab_size, (args.prompt_tokens,), generator=torch.Generator().manual_seed(1)
    )
    prompt = prompt.tolist()
    lmforge.generate(target, prompt, max_new_tokens=4, eos_token_id=())  # warm-up
    t0 = time.perf_counter()
    greedy = lmforge.generate(target, prompt, max_new_tokens=args.new_tokens, eos_token_id=())
    t_greedy = time.perf_counter() - t0
    r = speculative_generate(target, draft, prompt, args.new_tokens, num_draft_tokens=args.k, eos_token_id=())
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; target {args.preset} (random, {args.dtype}, "
        f"{target.config.num_layers} layers, residual scale {args.residual_scale}), draft = its first "
        f"{args.draft_layers} layers, k = {args.k}, "
        f"prompt {args.prompt_tokens}, {args.new_tokens} new tokens"
    )
    print(f"identical to greedy: {r.tokens == greedy}")
    print(f"greedy: {t_greedy:.2f} s ({args.new_tokens / t_greedy:.2f} tokens/s)")
    print(
        f"speculative: {r.seconds:.2f} s ({args.new_tokens / r.seconds:.2f} tokens/s), acceptance "
        f"{r.acceptance_rate:.0%} ({r.accepted}/{r.drafted}), {r.target_forwards} target passes"
    )
    print(f"speed-up: {t_greedy / r.seconds:.2f}x")


if __name__ == "__main__":
    main()
