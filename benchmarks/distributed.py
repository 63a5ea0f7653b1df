"""Distributed training on CPU (gloo): what FSDP saves per rank, and how 2 ranks scale.

1. Per-rank resident bytes of parameters + gradients + optimizer state (AdamW) under FSDP on 2 ranks,
   against 1 process holding everything (goal: <= 0.55x), counted from the tensors themselves (local
   shards of DTensors) after one training step.
2. Training tokens/s of 2 ranks x 1 thread (DDP and FSDP) against 1 rank x 1 thread on the same global
   batch (1 rank accumulates 2 micro-batches): the scaling efficiency is tokens/s ratio / 2.

    python benchmarks/distributed.py [--hidden 256 --layers 4 --steps 12]

Launches itself under torchrun (python -m torch.distributed.run) for the 2-rank runs; one JSON line per
run is printed and the summary goes to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time

import torch


def tensor_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def worker(args: argparse.Namespace) -> None:
    from lmforge import ModelConfig, Transformer
    from lmforge.parallel.mesh import ParallelConfig, build_mesh
    from lmforge.parallel.parallelize import parallelize
    from lmforge.runtime import init_distributed, is_rank0, world_size
    from lmforge.train.objectives import causal_lm
    from lmforge.train.optim import build_optimizer
    from lmforge.train.step import forward_backward, optimizer_step

    torch.set_num_threads(1)
    device = init_distributed()
    config = ModelConfig(
        vocab_size=4096,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        num_kv_heads=max(1, args.hidden // 128),
        intermediate_size=args.hidden * 3,
        max_position_embeddings=args.seq_len,
        tie_embeddings=False,
    )
    torch.manual_seed(0)
    model = Transformer(config)
    world = world_size()
    parallel = ParallelConfig(parallel=args.strategy if world > 1 else "none")
    mesh = build_mesh(parallel, world, device.type) if world > 1 else None
    step_model = parallelize(model, parallel, mesh, compile=False, dtype="float32")
    optimizer = build_optimizer(model, 1e-3)
    accum = 2 // world
    g = torch.Generator().manual_seed(1)
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    for step in range(args.steps):
        micro = []
        for _ in range(accum):
            ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len + 1), generator=g)
            micro.append({"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
        t0 = time.perf_counter()
        result = forward_backward(step_model, micro, causal_lm, None, device, mesh)
        if step == 0:  # gradients exist now: count them before the optimizer step clears them
            grads = tensor_bytes(p.grad for p in params)
        optimizer_step(optimizer, params, 1.0, result.loss)
        times.append(time.perf_counter() - t0)
    state = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    record = {
        "strategy": parallel.parallel,
        "world": world,
        "param_bytes": tensor_bytes(params),
        "grad_bytes": grads,
        "optimizer_bytes": tensor_bytes(state),
        "tokens_per_s": 2 * args.batch * args.seq_len / sorted(times[2:])[len(times[2:]) // 2],
    }
    if is_rank0():
        print(json.dumps(record), flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4, help="micro-batch per rank")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--strategy", default="none")
    p.add_argument("--worker", action="store_true")
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    common = [f"--hidden={args.hidden}", f"--layers={args.layers}", f"--seq-len={args.seq_len}"]
    common += [f"--batch={args.batch}", f"--steps={args.steps}", "--worker"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for strategy in ("none", "ddp", "fsdp"):
        if strategy == "none":
            cmd = [sys.executable, __file__, *common]
        else:
            launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
            cmd = [*launch, f"--master-port={free_port()}", __file__, *common, f"--strategy={strategy}"]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
        record = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(record))
        runs[strategy] = record
    state = lambda r: r["param_bytes"] + r["grad_bytes"] + r["optimizer_bytes"]  # noqa: E731
    print(f"FSDP per-rank params+grads+optimizer: {state(runs['fsdp']) / state(runs['none']):.3f}x one process")
    for s in ("ddp", "fsdp"):
        ratio = runs[s]["tokens_per_s"] / runs["none"]["tokens_per_s"]
        print(f"{s}: 2 ranks x 1 thread {ratio:.2f}x the tokens/s of 1 x 1 (scaling efficiency {ratio / 2:.0%})")


if __name__ == "__main__":
    main()
