"""`lmforge plan`: per-device memory, KV cache and step time of a (distributed) training job."""

from __future__ import annotations

import argparse
import json

from lmforge.cli import command
from lmforge.commands.flags import Options, add_options
from lmforge.planner.config import PlanConfig


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="a preset name, an HF checkpoint directory, or a config file")
    p.add_argument("--json", action="store_true", default=None, help="print one JSON object instead of a table")
    p.add_argument("--config", help="a JSON or TOML file with any of these options (flags given win)")
    add_options(p, PlanConfig, title="plan options")


@command(
    "plan", "per-device memory and step time of training a model under DDP, FSDP or tensor parallelism", _plan_args
)
def run_plan(args: argparse.Namespace) -> int:
    from lmforge.checkpoint import config_from_spec
    from lmforge.planner import format_plan, plan_training

    o = Options(args, args.config)
    (model,) = o.require("model")
    cfg = o.build(PlanConfig)
    as_json = bool(o.value("json"))
    o.check_file_used()
    plan = plan_training(config_from_spec(model), cfg)
    print(json.dumps({"model": str(model), **plan.to_dict()}) if as_json else format_plan(str(model), plan))
    return 0
