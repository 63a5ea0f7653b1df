"""One rank of a multi-process test, launched by tests/test_parallel.py under torchrun on CPU (gloo).

    python -m torch.distributed.run --nproc-per-node N tests/parallel_worker.py SCENARIO[,SCENARIO...] OUT.json

Every rank builds the same tiny model from the same seed, runs each SCENARIO distributed and, alongside,
the single-process reference (cheap at this size); rank 0 writes the measured differences to OUT.json
({scenario: measurements}), which the test reads and judges.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict
from torch.distributed.tensor import DTensor

from lmforge import ModelConfig, Transformer
from lmforge.errors import LmforgeError
from lmforge.parallel import ParallelConfig, build_mesh, parallelize
from lmforge.parallel.export import gather_model
from lmforge.parallel.step import dp_coords, grad_sync, loss_context, normalize_grads
from lmforge.parallel.tp import apply_tp
from lmforge.runtime import destroy, init_distributed, is_rank0, world_size
from lmforge.train.objectives import IGNORE_INDEX, causal_lm
from lmforge.train.optim import build_optimizer

torch.set_num_threads(1)
DCP_DIR: Path | None = None  # where fsdp() saves its sharded checkpoint (next to the results file)
LR = 1e-3  # Adam's first step is ~lr * g/|g|: a larger lr only magnifies float rounding of tiny gradients


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def twins(config: ModelConfig, seed: int = 0) -> tuple[Transformer, Transformer]:
    """(the model to distribute, its single-process reference) with identical weights."""
    torch.manual_seed(seed)
    ref = Transformer(config)
    model = Transformer(config)
    model.load_state_dict(ref.state_dict())
    return model, ref


def batch(n: int, t: int, vocab: int, seed: int = 1) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (n, t + 1), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:].clone()}


def rows(b: dict[str, torch.Tensor], index: int, count: int) -> dict[str, torch.Tensor]:
    """This data-parallel rank's share of a global batch."""
    per = b["input_ids"].shape[0] // count
    return {k: v[index * per : (index + 1) * per] for k, v in b.items()}


def mean_loss(model: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    out = causal_lm(model, b)
    return out.loss_sum / out.weight


def max_diff(pairs: Any) -> float:
    return max(float((full(a).float() - b.detach().float()).abs().max()) for a, b in pairs)


def grads_vs(model: torch.nn.Module, ref: torch.nn.Module) -> float:
    names = [n for n, _ in model.named_parameters()]
    assert names == [n for n, _ in ref.named_parameters()], "parameter names changed"
    return max_diff((p.grad, q.grad) for p, q in zip(model.parameters(), ref.parameters(), strict=True))


def params_vs(model: torch.nn.Module, ref: torch.nn.Module) -> float:
    return max_diff(zip(model.parameters(), ref.parameters(), strict=True))


def fsdp() -> dict[str, Any]:
    """FSDP2 gradients on different data per rank == the mean of the single-process gradients (PyTorch
    issue 162338: gloo's AVG reduce-scatter), one step, the export gather; with CPU offload; in bf16."""
    out: dict[str, Any] = {}
    config = ModelConfig.from_preset("tiny-llama")
    r, n = dist.get_rank(), world_size()
    data = batch(2 * n, 16, config.vocab_size)
    for name, offload in (("fsdp", False), ("fsdp_offload", True)):
        pc = ParallelConfig(parallel="fsdp", fsdp_cpu_offload=offload)
        model, ref = twins(config)
        mesh = build_mesh(pc, n, "cpu")
        step_model = parallelize(model, pc, mesh, compile=False, dtype="float32", checkpointing="full")
        mean_loss(step_model, rows(data, r, n)).backward()
        for k in range(n):  # the mean over ranks of each rank's own mean-loss gradient
            (mean_loss(ref, rows(data, k, n)) / n).backward()
        out[f"{name}_grad_diff"] = grads_vs(model, ref)
        out[f"{name}_grad_max"] = max(float(q.grad.abs().max()) for q in ref.parameters())
        opt, ref_opt = build_optimizer(model, LR), build_optimizer(ref, LR)
        opt.step()
        ref_opt.step()
        out[f"{name}_param_diff"] = params_vs(model, ref)
        plain = gather_model(model)
        if name == "fsdp" and DCP_DIR is not None:  # a sharded checkpoint, for test_parallel to load in one process
            dcp.save(get_model_state_dict(model), checkpoint_id=DCP_DIR)
            if is_rank0():
                torch.save(ref.state_dict(), DCP_DIR / "reference.pt")
        if is_rank0():
            assert plain is not None
            ref_state = ref.state_dict()
            out[f"{name}_export_keys_match"] = sorted(plain.state_dict()) == sorted(ref_state)
            out[f"{name}_export_diff"] = max_diff((ref_state[k], v) for k, v in plain.state_dict().items())
    # bf16 compute (MixedPrecisionPolicy param_dtype bf16, fp32 reduce): the fp32 master weights and their
    # gradients stay fp32, the gradients close to the fp32 ones.
    pc = ParallelConfig(parallel="fsdp")
    model, ref = twins(config)
    step_model = parallelize(model, pc, build_mesh(pc, n, "cpu"), compile=False, dtype="bfloat16")
    mean_loss(step_model, rows(data, r, n)).backward()
    for k in range(n):
        (mean_loss(ref, rows(data, k, n)) / n).backward()
    out["bf16_grad_dtypes"] = sorted({str(p.grad.dtype) for p in model.parameters()})
    out["bf16_grad_diff"] = grads_vs(model, ref)
    return out


def tp() -> dict[str, Any]:
    """Tensor parallel forward (logits), backward (gradients) and one AdamW step == one process, for a
    tied Llama (sequence and loss parallel), an untied one (neither) and GLM-4 (post-sub-layer norms, qkv
    bias, a padding row); and the refusal of a model TP cannot split."""
    out: dict[str, Any] = {}
    n = world_size()
    cases = {
        "tied_sp_lossparallel": (ModelConfig.from_preset("tiny-llama"), True, True, "selective"),
        "untied_plain": (ModelConfig.from_preset("tiny-llama").replace(tie_embeddings=False), False, False, "none"),
        "glm4_sp": (ModelConfig.from_preset("tiny-glm4"), True, False, "full"),
    }
    for name, (config, sp, lp, ac) in cases.items():
        pc = ParallelConfig(parallel="tp", sequence_parallel=sp, loss_parallel=lp)
        model, ref = twins(config)
        mesh = build_mesh(pc, n, "cpu")
        step_model = parallelize(model, pc, mesh, compile=False, dtype="float32", checkpointing=ac)
        data = batch(2, 16, config.vocab_size)
        with loss_context(pc):
            logits = step_model(data["input_ids"])
            out[f"{name}_logits_dtensor"] = isinstance(logits, DTensor)
            out[f"{name}_logits_diff"] = max_diff([(logits, ref(data["input_ids"]))])
            mean_loss(step_model, data).backward()
        mean_loss(ref, data).backward()
        out[f"{name}_grad_diff"] = grads_vs(model, ref)
        out[f"{name}_local_heads"] = [model.layers[0].attn.num_heads, model.layers[0].attn.num_kv_heads]
        # eps 1e-6: Adam's first step is lr * g / (|g| + eps), whose slope 1/eps turns the ~1e-10 rounding of
        # gradients that are ~0 by symmetry (GLM-4's key biases) into ~1e-5 parameter noise at eps 1e-8.
        opt, ref_opt = build_optimizer(model, LR, eps=1e-6), build_optimizer(ref, LR, eps=1e-6)
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)  # DTensor gradients throughout
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1.0)
        opt.step()
        ref_opt.step()
        out[f"{name}_param_diff"] = params_vs(model, ref)
    bad = ModelConfig.from_preset("tiny-llama").replace(num_heads=6, num_kv_heads=3, intermediate_size=161)
    mesh = build_mesh(ParallelConfig(parallel="tp"), n, "cpu")
    try:
        apply_tp(Transformer(bad), mesh)
        out["bad_config_error"] = None
    except LmforgeError as e:
        out["bad_config_error"] = str(e)
    return out


def mesh2d() -> dict[str, Any]:
    """fsdp+tp on a dp2 x tp2 mesh: a few AdamW steps whose losses follow the single-process run on the
    same global batch."""
    config = ModelConfig.from_preset("tiny-llama")
    pc = ParallelConfig(parallel="fsdp+tp", tp=2, loss_parallel=True)
    mesh = build_mesh(pc, world_size(), "cpu")
    assert mesh is not None
    model, ref = twins(config)
    step_model = parallelize(model, pc, mesh, compile=False, dtype="float32", checkpointing="selective")
    opt, ref_opt = build_optimizer(model, 1e-2, eps=1e-6), build_optimizer(ref, 1e-2, eps=1e-6)  # eps: see tp()
    index, count = dp_coords(mesh)
    data = batch(4, 16, config.vocab_size)
    losses, ref_losses = [], []
    for _ in range(4):
        with loss_context(pc):
            o = causal_lm(step_model, rows(data, index, count))
            o.loss_sum.backward()
        total = normalize_grads(model.parameters(), float(o.weight), mesh)
        loss_sum = torch.tensor(float(full(o.loss_sum)))
        dist.all_reduce(loss_sum, group=mesh["dp"].get_group())
        losses.append(float(loss_sum) / total)
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref_loss = mean_loss(ref, data)
        ref_loss.backward()
        ref_losses.append(float(ref_loss.detach()))
        torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1.0)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
    plain = gather_model(model)  # the export path under both dimensions
    export_diff = max_diff((ref.state_dict()[k], v) for k, v in plain.state_dict().items()) if plain else None
    meshes = sorted({str(p.device_mesh.mesh_dim_names) for p in model.parameters()})
    placements = sorted({str(p.placements) for p in model.parameters()})
    try:  # a length the tp ranks cannot split is refused (after FSDP's root has gathered its parameters)
        step_model(data["input_ids"][:, :15])
        odd_length_error = None
    except LmforgeError as e:
        odd_length_error = str(e)
    return {
        "losses": losses,
        "ref_losses": ref_losses,
        "param_diff": params_vs(model, ref),
        "export_diff": export_diff,
        "odd_length_error": odd_length_error,
        "meshes": meshes,
        "placements": placements,
    }


def ddp() -> dict[str, Any]:
    """DDP == one process on the same global batch: a plain step, then a step of two accumulated
    micro-batches (no_sync on the first) whose ranks hold different numbers of labelled tokens, normalized
    by normalize_grads into the exact global token mean."""
    config = ModelConfig.from_preset("tiny-llama")
    pc = ParallelConfig(parallel="ddp")
    mesh = build_mesh(pc, world_size(), "cpu")
    model, ref = twins(config)
    step_model = parallelize(model, pc, mesh, compile=False, dtype="float32", checkpointing="full")
    opt, ref_opt = build_optimizer(model, LR), build_optimizer(ref, LR)
    index, count = dp_coords(mesh)
    out: dict[str, Any] = {"wrapper": type(step_model).__name__}

    data = batch(4, 16, config.vocab_size)
    mean_loss(step_model, rows(data, index, count)).backward()
    mean_loss(ref, data).backward()
    out["grad_diff"] = grads_vs(model, ref)
    opt.step()
    ref_opt.step()
    opt.zero_grad(set_to_none=True)
    ref_opt.zero_grad(set_to_none=True)

    micro = [batch(4, 16, config.vocab_size, seed=s) for s in (2, 3)]
    for b in micro:  # the second half of each batch (rank 1's rows) loses most of its labels
        b["labels"][2:, :12] = IGNORE_INDEX
    weight = 0.0
    for i, b in enumerate(micro):
        with grad_sync(step_model, i == len(micro) - 1):
            o = causal_lm(step_model, rows(b, index, count))
            o.loss_sum.backward()
        weight += float(o.weight)
    out["global_weight"] = normalize_grads(model.parameters(), weight, mesh)
    ref_outs = [causal_lm(ref, b) for b in micro]
    total = sum(float(o.weight) for o in ref_outs)
    out["ref_weight"] = total
    for o in ref_outs:
        (o.loss_sum / total).backward()
    out["accum_grad_diff"] = grads_vs(model, ref)
    opt.step()
    ref_opt.step()
    out["param_diff"] = params_vs(model, ref)
    return out


SCENARIOS = {"fsdp": fsdp, "tp": tp, "mesh2d": mesh2d, "ddp": ddp}


def main() -> None:
    global DCP_DIR
    names, path = sys.argv[1].split(","), Path(sys.argv[2])
    DCP_DIR = path.parent / "dcp"
    init_distributed()
    try:
        # Several scenarios per launch: starting torchrun and importing torch costs more than they do.
        results = {name: SCENARIOS[name]() for name in names}
        if is_rank0():
            path.write_text(json.dumps(results, indent=2))
    finally:
        destroy()


if __name__ == "__main__":
    main()
