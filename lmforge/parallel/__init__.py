"""Passes that prepare a model for distributed training, applied from outside the model file, once, in a
fixed order (parallelize.py): tensor parallel (tp.py), activation checkpointing (checkpointing.py),
compile (compile.py), FSDP2 (fsdp.py) or DDP (ddp.py); the mesh and its config (mesh.py), the process
group (env.py), the training step's helpers (step.py) and full weights for export (export.py)."""

from lmforge.parallel.mesh import ParallelConfig, build_mesh
from lmforge.parallel.parallelize import parallelize

__all__ = ["ParallelConfig", "build_mesh", "parallelize"]
