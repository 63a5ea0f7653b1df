"""A short check of lmforge's GPU paths, for whenever a CUDA machine is at hand (tests never need one):

    python scripts/gpu_check.py                       # bf16 autocast training, compile, the engine on cuda
    torchrun --nproc-per-node 1 scripts/gpu_check.py  # the same, plus NCCL and FSDP2 through parallelize

Each check prints one line, PASS or FAIL with the reason; the exit code is the number of failures.
"""

from __future__ import annotations

import sys
import traceback

import torch

from lmforge import ModelConfig, Transformer


def tiny() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig.from_preset("tiny-llama")).cuda()


def check_autocast() -> str:
    from lmforge.runtime import autocast, probe_precision
    from lmforge.train.objectives import causal_lm

    choice = probe_precision("cuda").choice
    model = tiny()
    ids = torch.randint(0, 512, (2, 65), device="cuda")
    with autocast("bfloat16", "cuda"):
        out = causal_lm(model, {"input_ids": ids[:, :-1], "labels": ids[:, 1:]})
    out.loss_sum.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    return f"bf16 autocast on cuda trains with fp32 grads (auto chooses {choice})"


def check_compile() -> str:
    model = tiny().eval()
    ids = torch.randint(0, 512, (1, 32), device="cuda")
    with torch.no_grad():
        eager = model(ids)
        compiled = torch.compile(model)(ids)
    err = (eager - compiled).abs().max().item()
    assert err < 1e-3, err
    return f"torch.compile matches eager (max diff {err:.1e})"


def check_engine() -> str:
    import lmforge

    model = tiny().eval()
    out = lmforge.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=8, eos_token_id=())
    alone = lmforge.generate(model, [4, 5], max_new_tokens=8, eos_token_id=())
    assert out[1] == alone, (out, alone)
    return "the engine decodes on cuda; batched == alone"


def check_nccl() -> str:
    import torch.distributed as dist

    from lmforge.parallel.mesh import ParallelConfig, build_mesh
    from lmforge.parallel.parallelize import parallelize
    from lmforge.runtime import init_distributed, world_size

    if world_size() == 1 and "RANK" not in __import__("os").environ:
        return "skipped (run under torchrun for NCCL)"
    device = init_distributed()
    assert dist.get_backend() == "nccl", dist.get_backend()
    t = torch.ones(1, device=device)
    dist.all_reduce(t)
    assert t.item() == world_size()
    model = tiny()
    config = ParallelConfig(parallel="fsdp")
    step_model = parallelize(model, config, build_mesh(config, world_size(), "cuda"), compile=False, dtype="bfloat16")
    ids = torch.randint(0, 512, (2, 33), device=device)
    step_model(ids).float().mean().backward()
    return f"NCCL all_reduce and an FSDP2 bf16 backward on {world_size()} rank(s)"


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    failures = 0
    for check in (check_autocast, check_compile, check_engine, check_nccl):
        try:
            print(f"PASS {check.__name__}: {check()}")
        except Exception as e:  # report every check, not just the first failure
            failures += 1
            print(f"FAIL {check.__name__}: {type(e).__name__}: {e}")
            traceback.print_exc(limit=3)
    return failures


if __name__ == "__main__":
    sys.exit(main())
