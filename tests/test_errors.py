"""Bad input raises lmforge.LmforgeError with a message that says what is wrong; the CLI prints it on one
line and exits 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_hf_model
from safetensors.torch import load_file, save_file

import lmforge
from lmforge import LmforgeError, ModelConfig, RopeScaling

BASE = dict(vocab_size=100, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)


def raises(fn, *words: str) -> str:
    """Call fn, expect LmforgeError, and check that every word appears in the message."""
    with pytest.raises(LmforgeError) as info:
        fn()
    msg = str(info.value)
    for word in words:
        assert word.lower() in msg.lower(), f"{word!r} not in {msg!r}"
    return msg


@pytest.fixture(scope="module")
def glm_ckpt(tmp_path_factory) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json dict, tensors) of a tiny GLM checkpoint (fused gate_up_proj, q/k/v bias)."""
    path = tmp_path_factory.mktemp("glm")
    make_hf_model("glm", path, head_dim=16)
    return json.loads((path / "config.json").read_text()), load_file(path / "model.safetensors")


def write_ckpt(path: Path, config: dict, state: dict[str, torch.Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


# --- paths ---------------------------------------------------------------------------------------------
def test_path_does_not_exist(tmp_path: Path):
    raises(lambda: lmforge.load_pretrained(tmp_path / "nope"), "does not exist", "nope")


def test_directory_without_config(tmp_path: Path):
    raises(lambda: lmforge.load_pretrained(tmp_path), "no config.json")


def test_path_is_a_file(tmp_path: Path):
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    raises(lambda: lmforge.load_pretrained(tmp_path / "weights.safetensors"), "is a file", "directory")


def test_config_not_json(tmp_path: Path, glm_ckpt):
    path = write_ckpt(tmp_path / "c", *glm_ckpt)
    (path / "config.json").write_text("{oops")
    raises(lambda: lmforge.load_pretrained(path), "config.json", "not valid JSON")


def test_no_weights(tmp_path: Path, glm_ckpt):
    path = write_ckpt(tmp_path / "c", *glm_ckpt)
    (path / "model.safetensors").unlink()
    raises(lambda: lmforge.load_pretrained(path), "no model.safetensors")


def test_bin_weights_point_to_conversion(tmp_path: Path, glm_ckpt):
    path = write_ckpt(tmp_path / "c", *glm_ckpt)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"\0")
    raises(lambda: lmforge.load_pretrained(path), ".bin", "safetensors")


def test_index_lists_a_missing_shard(tmp_path: Path):
    path = tmp_path / "hf"
    make_hf_model("llama").save_pretrained(path, max_shard_size="50KB")
    shards = sorted(path.glob("model-*.safetensors"))
    shards[1].unlink()
    raises(lambda: lmforge.load_pretrained(path), shards[1].name, "missing")


# --- model types and tensors ---------------------------------------------------------------------------
@pytest.mark.parametrize("model_type", ["mistral", "gpt2", None])
def test_unsupported_model_type(tmp_path: Path, glm_ckpt, model_type):
    config, state = glm_ckpt
    config = {**config, "model_type": model_type}
    path = write_ckpt(tmp_path / "c", config, state)
    raises(lambda: lmforge.load_pretrained(path), "model_type", str(model_type), "llama", "qwen2", "glm", "glm4")


def test_missing_tensor(tmp_path: Path, glm_ckpt):
    config, state = glm_ckpt
    state = {k: v for k, v in state.items() if k != "model.layers.1.self_attn.k_proj.bias"}
    path = write_ckpt(tmp_path / "c", config, state)
    raises(lambda: lmforge.load_pretrained(path), "missing", "model.layers.1.self_attn.k_proj.bias")


def test_missing_untied_head(tmp_path: Path, glm_ckpt):
    config, state = glm_ckpt
    state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    path = write_ckpt(tmp_path / "c", config, state)
    raises(lambda: lmforge.load_pretrained(path), "missing", "lm_head.weight")


def test_unexpected_tensor(tmp_path: Path, glm_ckpt):
    config, state = glm_ckpt
    state = {**state, "model.layers.0.mlp.extra_proj.weight": torch.zeros(4, 4)}
    path = write_ckpt(tmp_path / "c", config, state)
    raises(lambda: lmforge.load_pretrained(path), "unexpected", "model.layers.0.mlp.extra_proj.weight")


def test_wrong_family_weights(tmp_path: Path, glm_ckpt):
    """GLM weights (fused gate_up_proj) under a llama config.json: both sides of the mismatch are named."""
    config, state = glm_ckpt
    config = {**config, "model_type": "llama", "attention_bias": False, "partial_rotary_factor": 1.0}
    config.pop("rope_parameters")
    path = write_ckpt(tmp_path / "c", config, state)
    raises(lambda: lmforge.load_pretrained(path), "missing", "gate_proj", "unexpected", "gate_up_proj")


@pytest.mark.parametrize(
    "name, shape",
    [
        ("model.layers.1.self_attn.o_proj.weight", (64, 32)),
        ("model.layers.0.mlp.gate_up_proj.weight", (250, 64)),  # fused: 2 * intermediate rows expected
        ("model.embed_tokens.weight", (301, 64)),
    ],
)
def test_wrong_shape(tmp_path: Path, glm_ckpt, name: str, shape: tuple[int, ...]):
    config, state = glm_ckpt
    expected = list(state[name].shape)
    state = {**state, name: torch.zeros(shape)}
    path = write_ckpt(tmp_path / "c", config, state)
    raises(lambda: lmforge.load_pretrained(path), name, str(list(shape)), str(expected), "config.json")


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_safetensors(tmp_path: Path, glm_ckpt, keep: float):
    path = write_ckpt(tmp_path / "c", *glm_ckpt)
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: int(len(data) * keep)])
    raises(lambda: lmforge.load_pretrained(path), "model.safetensors", "truncated or corrupt")


@pytest.mark.parametrize("garbage", [b"", b"\x01\x02", bytes(range(256)) * 40, b"\x10\0\0\0\0\0\0\0{not json}      "])
def test_garbage_safetensors(tmp_path: Path, glm_ckpt, garbage: bytes):
    path = write_ckpt(tmp_path / "c", *glm_ckpt)
    (path / "model.safetensors").write_bytes(garbage)
    raises(lambda: lmforge.load_pretrained(path), "model.safetensors", "not a readable safetensors file")


# --- config values -------------------------------------------------------------------------------------
def test_heads_not_divisible_by_kv_heads():
    raises(lambda: ModelConfig(**{**BASE, "num_kv_heads": 3}), "num_heads 4", "num_kv_heads 3", "multiple")


def test_heads_not_divisible_by_kv_heads_in_config_json(tmp_path: Path, glm_ckpt):
    config, state = glm_ckpt
    path = write_ckpt(tmp_path / "c", {**config, "num_key_value_heads": 3}, state)
    raises(lambda: lmforge.load_pretrained(path), "num_kv_heads 3", "multiple")


@pytest.mark.parametrize("head_dim, factor, rot", [(18, 0.5, 9), (6, 0.5, 3), (16, 0.0625, 1)])
def test_odd_rotary_dim(head_dim: int, factor: float, rot: int):
    raises(
        lambda: ModelConfig(
            **BASE, head_dim=head_dim, partial_rotary_factor=factor, rope_interleaved=True, family="glm"
        ),
        "rotary dimension",
        f"= {rot} ",
        "even",
    )


def test_hidden_not_divisible_by_heads():
    raises(lambda: ModelConfig(**{**BASE, "hidden_size": 66}), "hidden_size 66", "num_heads 4", "head_dim")


@pytest.mark.parametrize("field, value", [("vocab_size", 0), ("num_layers", -1), ("hidden_size", 64.0)])
def test_non_positive_sizes(field: str, value):
    raises(lambda: ModelConfig(**{**BASE, field: value}), field, "positive integer")


def test_unknown_config_key_suggests():
    raises(lambda: ModelConfig.from_dict({**BASE, "num_head": 4}), "unknown", "num_head", "did you mean", "num_heads")
    raises(lambda: ModelConfig.from_dict({**BASE, "rope_scalling": None}), "rope_scalling", "rope_scaling")
    raises(lambda: ModelConfig.from_preset("tiny-llama").replace(tie_embedding=True), "tie_embeddings")


@pytest.mark.parametrize("rope_type, suggestion", [("yarnn", "yarn"), ("lama3", "llama3"), ("ntk", None)])
def test_unknown_rope_type(rope_type: str, suggestion: str | None):
    msg = raises(lambda: RopeScaling(rope_type, factor=2.0), "unknown rope scaling type", rope_type, "linear", "yarn")
    if suggestion:
        assert f"Did you mean: {suggestion}" in msg
    raises(lambda: ModelConfig(**BASE, rope_scaling={"rope_type": rope_type, "factor": 2.0}), rope_type)


def test_unknown_rope_type_in_config_json(tmp_path: Path, glm_ckpt):
    config, state = glm_ckpt
    config = {**config, "rope_parameters": {"rope_type": "superrope", "rope_theta": 1e4}}
    path = write_ckpt(tmp_path / "c", config, state)
    raises(lambda: lmforge.load_pretrained(path), "superrope", "llama3")


def test_rope_scaling_missing_and_unknown_keys():
    raises(lambda: RopeScaling("llama3", factor=8.0, original_max_position_embeddings=64), "low_freq_factor")
    raises(lambda: RopeScaling("linear"), "needs factor")
    raises(lambda: RopeScaling("linear", factor=0.0), "factor", "> 0")
    raises(lambda: RopeScaling.from_dict({"rope_type": "linear", "factor": 2.0, "fator": 1}), "fator")


def test_family_constraints_say_what_to_change():
    raises(
        lambda: ModelConfig(**BASE, family="llama", partial_rotary_factor=0.5), "'llama'", "partial_rotary_factor=1.0"
    )
    raises(lambda: ModelConfig(**BASE, family="qwen2"), "'qwen2'", "qkv_bias=True")
    raises(lambda: ModelConfig(**BASE, family="glm4", rope_interleaved=True), "post_sublayer_norms=True")
    raises(lambda: ModelConfig(**BASE, family="mistral"), "family", "llama, qwen2, glm, glm4")


def test_token_ids_outside_vocab():
    raises(lambda: ModelConfig(**BASE, eos_token_id=100), "eos_token_id 100", "vocabulary")
    raises(lambda: ModelConfig(**BASE, pad_token_id=-1), "pad_token_id", "vocabulary")


def test_unsupported_hf_features():
    hf = ModelConfig.from_preset("tiny-qwen2").to_hf()
    raises(lambda: ModelConfig.from_hf({**hf, "hidden_act": "gelu"}), "hidden_act", "gelu")
    raises(lambda: ModelConfig.from_hf({**hf, "use_sliding_window": True}), "use_sliding_window")
    raises(lambda: ModelConfig.from_hf({**hf, "quantization_config": {"bits": 4}}), "quantiz")


# --- presets -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, close",
    [
        ("qwen2.5-05b", "qwen2.5-0.5b"),
        ("lama-3.1-8b", "llama-3.1-8b"),
        ("glm4-9b", "glm-4-9b"),
        ("tiny-lama", "tiny-llama"),
    ],
)
def test_unknown_preset_suggests(name: str, close: str):
    msg = raises(lambda: ModelConfig.from_preset(name), "unknown preset", name, "did you mean", "--list")
    suggested = msg.split("Did you mean: ")[1].split("?")[0].split(", ")
    assert close in suggested


def test_unknown_preset_without_close_names():
    msg = raises(lambda: ModelConfig.from_preset("zzzzzz"), "unknown preset")
    assert "Did you mean" not in msg


# --- saving --------------------------------------------------------------------------------------------
def test_bad_shard_size(tmp_path: Path):
    model = lmforge.Transformer(ModelConfig.from_preset("tiny-qwen2"))
    raises(lambda: lmforge.save_pretrained(model, tmp_path / "c", max_shard_size="lots"), "lots", "5GB")
    assert list(tmp_path.iterdir()) == []


def test_save_onto_a_file(tmp_path: Path):
    (tmp_path / "c").write_text("not a directory")
    model = lmforge.Transformer(ModelConfig.from_preset("tiny-qwen2"))
    raises(lambda: lmforge.save_pretrained(model, tmp_path / "c"), "is a file")
    assert (tmp_path / "c").read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


# --- CLI -----------------------------------------------------------------------------------------------
# Two ways to start the CLI in a fresh process: `python -m lmforge.cli` and what the installed `lmforge`
# console script runs (`lmforge.cli:main`, see pyproject.toml).
LAUNCHERS = {
    "python-m": [sys.executable, "-m", "lmforge.cli"],
    "entry-point": [sys.executable, "-c", "import sys; from lmforge.cli import main; sys.exit(main())"],
}


def run_cli(launcher: str, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*LAUNCHERS[launcher], *args], capture_output=True, text=True, timeout=120, cwd=cwd)


@pytest.mark.parametrize("launcher", list(LAUNCHERS))
@pytest.mark.parametrize(
    "args, words",
    [
        (["info", "no-such-preset"], ["no-such-preset", "--list"]),
        (["convert", "/nonexistent", "OUT"], ["/nonexistent", "preset"]),
    ],
)
def test_cli_errors_are_one_line_exit_2(tmp_path: Path, launcher: str, args: list[str], words: list[str]):
    out = run_cli(launcher, *[str(tmp_path / "out") if a == "OUT" else a for a in args], cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith(f"lmforge {args[0]}: error: ")
    for word in words:
        assert word in lines[0]
    assert out.stdout == ""
    assert not (tmp_path / "out").exists()


def test_cli_in_process_errors(capsys, tmp_path: Path):
    """The same contract for more error paths, without a process per case."""
    from lmforge.cli import main

    cases = [
        ["info"],
        ["info", "qwen2.5-0.5b", "--seq-len", "0"],
        ["convert", "tiny-llama", str(tmp_path / "x"), "--dtype", "fp8"],
        ["convert", "tiny-llama", str(tmp_path / "y"), "--max-shard-size", "big"],
        ["convert", str(tmp_path), str(tmp_path / "z")],  # a directory without config.json
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith(f"lmforge {argv[0]}: error: "), (argv, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_longrope_factor_length_checked_at_config_time():
    scaling = RopeScaling(
        "longrope", original_max_position_embeddings=16, short_factor=(1.0,) * 3, long_factor=(1.0,) * 3
    )
    raises(lambda: ModelConfig.from_preset("tiny-llama").replace(rope_scaling=scaling), "short_factor", "rotary_dim/2")


@pytest.mark.parametrize("change", [{"partial_rotary_factor": None}, {"rope_theta": "abc"}])
def test_bad_rope_values_in_config_json(tmp_path: Path, glm_ckpt, change):
    config, state = glm_ckpt
    config = {k: v for k, v in config.items() if k != "rope_parameters"}
    path = write_ckpt(tmp_path / "c", {**config, **change}, state)
    raises(lambda: lmforge.load_pretrained(path), "rope")
