"""`lmforge plan`: per-device memory and step time of a training job, before running it.

    from lmforge.planner import PlanConfig, plan_training
    plan = plan_training(ModelConfig.from_preset("llama-3.1-8b"), PlanConfig(gpus=8, strategy="fsdp", seq_len=8192))
    plan.memory["peak"]  # bytes on one device

config.py holds the options, params.py the weights, gradients and optimizer state and how they are split,
activations.py the saved-tensor formulas of lmforge's decoder, plan.py the assembly (peak, KV cache, step
time), report.py the table. docs/distributed_plan.md works through examples and lists where it is off.
"""

from lmforge.planner.config import PlanConfig
from lmforge.planner.plan import Plan, plan_training
from lmforge.planner.report import format_plan

__all__ = ["Plan", "PlanConfig", "format_plan", "plan_training"]
