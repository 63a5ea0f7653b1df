"""Options declared once: flags and config-file keys come from the library's dataclasses; an explicit value is
respected or refused, never replaced; the library never imports the command line."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.cli import build_parser, main
from lmforge.commands.flags import Options
from lmforge.data.config import PrepareConfig, TokenizerTrainConfig
from lmforge.errors import LmforgeError
from lmforge.eval.run import EvalSettings
from lmforge.finetune.config import DistillConfig, DPOConfig, SFTConfig
from lmforge.finetune.lora import LoraConfig
from lmforge.generate.bench import BenchConfig
from lmforge.generate.options import GenerationOptions
from lmforge.loading import LoadOptions
from lmforge.options import from_mapping, read_config_file, specs
from lmforge.parallel.mesh import ParallelConfig
from lmforge.quant.prune import PruneConfig
from lmforge.quant.quantize import QuantConfig
from lmforge.quickstart import QuickstartOptions
from lmforge.train.config import TrainConfig


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


# Each command and the option dataclasses (with their flag prefix) it must expose.
COMMANDS = {
    ("pretrain",): [(TrainConfig, ""), (ParallelConfig, "")],
    ("finetune",): [(SFTConfig, ""), (LoraConfig, "lora_"), (TrainConfig, "")],
    ("dpo",): [(DPOConfig, ""), (LoraConfig, "lora_"), (TrainConfig, "")],
    ("distill",): [(DistillConfig, ""), (TrainConfig, "")],
    ("prepare", "in.txt", "--tokenizer", "t", "--out", "o"): [(PrepareConfig, "")],
    ("tokenizer", "train", "in.txt", "--out", "o"): [(TokenizerTrainConfig, "")],
    ("generate", "--model", "m"): [(GenerationOptions, ""), (LoadOptions, "")],
    ("chat", "--model", "m"): [(GenerationOptions, ""), (LoadOptions, "")],
    ("eval", "--model", "m", "--task", "t"): [(EvalSettings, ""), (LoadOptions, "")],
    ("bench", "--model", "m"): [(BenchConfig, ""), (LoadOptions, "")],
    ("quickstart",): [(QuickstartOptions, "")],
    ("quantize",): [(QuantConfig, "")],
    ("prune",): [(PruneConfig, "")],
}


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


@pytest.mark.parametrize("argv", list(COMMANDS), ids=lambda a: a[0] if isinstance(a, tuple) else str(a))
def test_every_option_is_a_flag_and_no_flag_restates_a_default(argv):
    sub = _subparser(argv[0])
    if argv[0] == "tokenizer":
        action = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction))
        sub = action.choices["train"]
    by_dest = {a.dest: a for a in sub._actions}
    for cls, prefix in COMMANDS[argv]:
        for spec in specs(cls):
            action = by_dest.get(prefix + spec.name)
            assert action is not None, f"{argv[0]} has no flag for {cls.__name__}.{spec.name}"
            # The flag holds no default of its own: unset flags leave the dataclass's default in charge.
            assert action.default is argparse.SUPPRESS, f"{argv[0]} --{spec.name} restates a default"
            assert spec.help, f"{cls.__name__}.{spec.name} has no help"
    # Nothing given: every dataclass builds with its own defaults.
    args = parse(*argv)
    o = Options(args)
    for cls, prefix in COMMANDS[argv]:
        assert o.build(cls, prefix) == cls()


@pytest.mark.parametrize(
    "argv, cls, prefix, field, value",
    [
        (("finetune", "--val-fraction", "0"), SFTConfig, "", "val_fraction", 0.0),
        (("dpo", "--val-fraction", "0"), DPOConfig, "", "val_fraction", 0.0),
        (("pretrain", "--warmup-steps", "0"), TrainConfig, "", "warmup_steps", 0),
        (("pretrain", "--grad-clip", "0"), TrainConfig, "", "grad_clip", 0.0),
        (("pretrain", "--weight-decay", "0"), TrainConfig, "", "weight_decay", 0.0),
        (("distill", "--alpha", "0"), DistillConfig, "", "alpha", 0.0),
        (("finetune", "--no-pack"), SFTConfig, "", "pack", False),
        (("generate", "--model", "m", "--temperature", "0"), GenerationOptions, "", "temperature", 0.0),
        (
            ("prepare", "x", "--tokenizer", "t", "--out", "o", "--val-fraction", "0"),
            PrepareConfig,
            "",
            "val_fraction",
            0,
        ),
    ],
)
def test_an_explicit_zero_or_false_is_respected(argv, cls, prefix, field, value):
    built = Options(parse(*argv)).build(cls, prefix)
    assert getattr(built, field) == value
    assert getattr(cls(), field) != value  # the default really is something else


@pytest.mark.parametrize(
    "argv, cls, prefix, match",
    [
        (("dpo", "--beta", "0"), DPOConfig, "", "beta must be positive"),
        (("finetune", "--lora-r", "0"), LoraConfig, "lora_", "rank r must be a positive integer"),
        (("finetune", "--lora-alpha", "0"), LoraConfig, "lora_", "alpha must be a positive number"),
        (("distill", "--temperature", "0"), DistillConfig, "", "temperature must be > 0"),
        (("finetune", "--val-fraction", "1"), SFTConfig, "", r"val_fraction must be in \[0, 1\)"),
    ],
)
def test_an_explicit_invalid_value_is_refused(argv, cls, prefix, match):
    with pytest.raises(LmforgeError, match=match):
        Options(parse(*argv)).build(cls, prefix)


def test_lora_options_need_method_lora(tmp_path, capsys):
    code = main(["finetune", "--model", "m", "--data", "d", "--out", str(tmp_path / "o"), "--lora-r", "4"])
    err = capsys.readouterr().err
    assert code == 2 and "--lora-r only apply to --method lora" in err


@pytest.mark.parametrize(
    "text, message",
    [
        ('steps = "three"\n', "steps must be an integer, got 'three'"),
        ("lr = true\n", "lr must be a number, got True"),
        ("compile = 1\n", "compile must be true or false, got 1"),
        ('schedule = "cosin"\n', "schedule must be one of cosine, wsd, constant, linear, got 'cosin'. Did you mean"),
        ("stepz = 3\n", "unknown options ['stepz']. Did you mean: steps"),
        ("warmup_steps = 1.5\n", "warmup_steps must be an integer, got 1.5"),
    ],
)
def test_a_wrongly_typed_config_file_value_is_one_clear_line(tmp_path, capsys, text, message):
    config = tmp_path / "train.toml"
    config.write_text(text)
    code = main(
        ["pretrain", "--model", "tiny-llama", "--data", "d", "--out", str(tmp_path / "o"), "--config", str(config)]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and message in err
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_flags_win_over_the_config_file_which_wins_over_defaults(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"steps": 7, "lr": 0.01, "lora_r": 2, "method": "lora", "model": "x"}))
    args = parse("finetune", "--config", str(config), "--lr", "0.5")
    o = Options(args, str(config))
    cfg, sft, lora = o.build(TrainConfig), o.build(SFTConfig), o.build(LoraConfig, "lora_")
    assert (cfg.steps, cfg.lr, cfg.batch_size) == (7, 0.5, TrainConfig().batch_size)
    assert (sft.method, lora.r, lora.alpha) == ("lora", 2, LoraConfig().alpha)
    assert o.value("model") == "x"


def test_config_file_must_be_one_object(tmp_path):
    bad = tmp_path / "c.json"
    bad.write_text("[1, 2]")
    with pytest.raises(LmforgeError, match="must hold one object"):
        read_config_file(bad)
    broken = tmp_path / "c.toml"
    broken.write_text("steps = \n")
    with pytest.raises(LmforgeError, match="cannot parse"):
        read_config_file(broken)


def test_tuple_options_from_flags_and_files():
    args = parse("finetune", "--lora-targets", "q,k,down")
    assert Options(args).build(LoraConfig, "lora_").targets == ("q", "k", "down")
    args = parse("generate", "--model", "m", "--stop-strings", "a,b", "--stop-strings", "\n", "--eos-token-id", "3,4")
    opts = Options(args).build(GenerationOptions)
    assert opts.stop_strings == ("a,b", "\n") and opts.eos_token_id == (3, 4)
    assert from_mapping(LoraConfig, {"targets": ["o", "q"]}).targets == ("q", "o")  # canonical order
    with pytest.raises(LmforgeError, match="must be a list of ints"):
        Options(parse("generate", "--model", "m", "--eos-token-id", "3,x")).build(GenerationOptions)


def test_lora_adapters_are_initialised_from_the_seed(tmp_path):
    """Two LoRA runs with the same --seed start from the same adapters; another seed starts elsewhere."""
    import lmforge
    from lmforge.finetune.runs import start_run
    from lmforge.tokenizer import Tokenizer

    base = tmp_path / "base"
    torch.manual_seed(0)
    lmforge.save_pretrained(lmforge.Transformer(lmforge.ModelConfig.from_preset("tiny-llama")), base)
    texts = [f"def f{i}(x):\n    return x * {i} + {i * i}  # number {i}\n" for i in range(200)]
    Tokenizer.train(texts, 300, "llama3", min_frequency=1).save(base)

    def adapters(seed: int, run: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(1234 + seed * 7)  # the global RNG must not matter
        start = start_run(base, tmp_path / run, "lora", LoraConfig(), False, seed)
        return {k: v.clone() for k, v in start.model.state_dict().items() if "lora_A" in k}

    a, b, c = adapters(3, "a"), adapters(3, "b"), adapters(4, "c")
    assert a and a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)


def test_the_library_never_imports_the_command_line():
    """Import every library module in a fresh interpreter; none may pull in lmforge.cli or lmforge.commands."""
    code = """
import importlib, pathlib, sys
import lmforge
skip = ("lmforge.cli", "lmforge.commands", "lmforge.__main__")
root = pathlib.Path(lmforge.__file__).parent
files = sorted(root.rglob("*.py"))  # walk the files: pkgutil.walk_packages would import every package itself
names = [".".join(("lmforge", *f.relative_to(root).with_suffix("").parts)).removesuffix(".__init__") for f in files]
names = [n for n in names if not n.startswith(skip)]
for name in names:
    importlib.import_module(name)
leaked = sorted(m for m in sys.modules if m.startswith(skip))
print(len(names), leaked)
sys.exit(1 if leaked else 0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    count = int(out.stdout.split()[0])
    assert count > 40  # it really walked the package


def test_model_config_does_no_file_io():
    """config.py reads no files: loading config.json from disk is the checkpoint side's job."""
    source = Path(__import__("lmforge.config").config.__file__).read_text()
    for needle in ("open(", "read_text", "json.load", "Path(", "import lmforge.checkpoint", "from lmforge.checkpoint"):
        assert needle not in source, needle
