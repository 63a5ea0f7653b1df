"""Bad input raises lmforge.LmforgeError with a message that says what is wrong; the CLI prints it on one
line and exits 2."""

from __future__ import annotations

import json
import math
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


def test_token_ids_outside_vocab_are_kept_warned_once_and_ignored(capsys, monkeypatch):
    """transformers keeps such ids and warns (validate_token_ids); so does lmforge, once per message."""
    monkeypatch.setattr(lmforge.errors, "_warned", set())
    c = ModelConfig(**BASE, eos_token_id=(100, 7, -3), pad_token_id=-1, bos_token_id=100)
    ModelConfig(**BASE, eos_token_id=(100, 7, -3), pad_token_id=-1, bos_token_id=100)  # same message: not repeated
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmforge: warning: "), err
    for word in ("[0, 100)", "bos_token_id 100", "eos_token_id 100, -3", "pad_token_id -1"):
        assert word in err
    assert (c.eos_token_id, c.pad_token_id, c.bos_token_id) == ((100, 7, -3), -1, 100)  # kept as given
    assert c.usable_eos_token_ids == (7,) and c.padding_idx is None
    model = lmforge.Transformer(c)
    assert model.embed.padding_idx is None  # nn.Embedding would read -1 as the last row
    in_vocab = ModelConfig(**BASE, pad_token_id=5)
    assert in_vocab.padding_idx == lmforge.Transformer(in_vocab).embed.padding_idx == 5


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


# --- config.json values: each names the key and what it must be -----------------------------------------
@pytest.mark.parametrize("content", ["[1, 2]", '"llama"', "3", "null"])
def test_config_json_not_an_object(tmp_path: Path, glm_ckpt, content: str):
    from lmforge.checkpoint import config_from_spec

    path = write_ckpt(tmp_path / "c", *glm_ckpt)
    (path / "config.json").write_text(content)
    raises(lambda: lmforge.load_pretrained(path), "config.json", "JSON object")
    raises(lambda: config_from_spec(path), "config.json", "JSON object")
    raises(lambda: config_from_spec(path / "config.json"), "config.json", "JSON object")
    raises(lambda: ModelConfig.from_hf(json.loads(content)), "config.json", "JSON object")


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("rms_norm_eps", "abc", ["config.json: rms_norm_eps must be a finite number > 0, got 'abc'"]),
        ("rms_norm_eps", None, ["rms_norm_eps", "got None"]),
        ("rms_norm_eps", -1e-5, ["rms_norm_eps", "> 0"]),
        ("rms_norm_eps", math.inf, ["rms_norm_eps", "finite"]),
        ("initializer_range", "0.02", ["config.json: initializer_range must be a finite number >= 0, got '0.02'"]),
        ("initializer_range", math.nan, ["initializer_range", "nan"]),
        ("num_key_value_heads", 0, ["config.json: num_key_value_heads must be a positive integer, got 0", "null"]),
        ("num_key_value_heads", -2, ["num_key_value_heads", "positive integer"]),
        ("max_position_embeddings", 100.5, ["max_position_embeddings must be a positive integer, got 100.5"]),
        ("max_position_embeddings", 128.0, ["max_position_embeddings", "got 128.0", "write it as 128"]),
        ("max_position_embeddings", "128", ["max_position_embeddings", "'128'"]),
        ("hidden_size", True, ["hidden_size must be a positive integer, got True"]),
        ("num_hidden_layers", [2], ["num_hidden_layers", "[2]"]),
        ("vocab_size", None, ["vocab_size", "got None"]),
        ("head_dim", 0, ["head_dim must be a positive integer, got 0", "null means"]),
        ("head_dim", 16.0, ["head_dim", "write it as 16"]),
        ("tie_word_embeddings", "false", ["tie_word_embeddings must be true or false, got 'false'"]),
        ("attention_bias", 1, ["attention_bias must be true or false, got 1"]),
        ("eos_token_id", "1", ["eos_token_id must be an integer, a list of integers or null, got '1'"]),
        ("eos_token_id", [1, [2]], ["eos_token_id", "[1, [2]]"]),
        ("eos_token_id", True, ["eos_token_id", "True"]),
        ("pad_token_id", 0.0, ["pad_token_id must be an integer token id or null, got 0.0"]),
        ("bos_token_id", {"id": 1}, ["bos_token_id", "{'id': 1}"]),
        ("rope_theta", math.inf, ["rope_theta must be a finite number > 1, got inf"]),
        ("rope_theta", 0, ["rope_theta", "> 1", "got 0"]),  # an explicit 0 is refused, not replaced by 10000
        ("rope_parameters", "default", ["rope_parameters must be a JSON object", "'default'"]),
        ("rope_parameters", [["rope_type", "default"]], ["rope_parameters must be a JSON object"]),
        ("rope_parameters", {"rope_type": "linear", "factor": "2"}, ["rope_parameters", "factor", "'2'"]),
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0, "beta_fast": -1}, ["rope_scaling", "beta_fast"]),
        (
            "rope_scaling",
            {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0},
            ["high_freq_factor (1.0) must be greater than low_freq_factor (4.0)"],
        ),
        ("model_type", ["glm"], ["unsupported model_type ['glm']"]),
        ("num_hidden_layers", 10**12, ["num_hidden_layers=1000000000000", "weights hold layers: 2"]),
        ("vocab_size", 10**15, ["embedding", "elements", "limit 2**40"]),
    ],
)
def test_bad_config_json_values(tmp_path: Path, glm_ckpt, key: str, value, words: list[str]):
    config, state = glm_ckpt
    config = {k: v for k, v in config.items() if k != "rope_parameters" or key == "rope_parameters"}
    path = write_ckpt(tmp_path / "c", {**config, key: value}, state)
    raises(lambda: lmforge.load_pretrained(path), *words)


def test_null_kv_heads_and_head_dim_mean_derived_as_in_transformers():
    """transformers reads null num_key_value_heads as num_attention_heads and null head_dim as hidden/heads."""
    from transformers import LlamaConfig

    hf = ModelConfig.from_preset("tiny-llama").to_hf()
    ours = ModelConfig.from_hf({**hf, "num_key_value_heads": None, "head_dim": None})
    theirs = LlamaConfig(**{**hf, "num_key_value_heads": None, "head_dim": None})
    assert (ours.num_kv_heads, ours.head_dim) == (theirs.num_key_value_heads, theirs.head_dim)
    assert ours.num_kv_heads == hf["num_attention_heads"] != hf["num_key_value_heads"]


@pytest.mark.parametrize(
    "change, words",
    [
        ({"norm_eps": "1e-5"}, ["norm_eps must be a finite number > 0, got '1e-5'"]),
        ({"rope_theta": math.nan}, ["rope_theta", "nan"]),
        ({"initializer_range": -0.02}, ["initializer_range", ">= 0"]),
        ({"max_position_embeddings": 100.5}, ["max_position_embeddings must be a positive integer, got 100.5"]),
        ({"num_kv_heads": 0}, ["num_kv_heads must be a positive integer, got 0"]),
        ({"head_dim": True}, ["head_dim", "True"]),
        ({"qkv_bias": "yes"}, ["qkv_bias must be true or false, got 'yes'"]),
        ({"eos_token_id": "abc"}, ["eos_token_id must be an integer or a list of integers, got 'abc'"]),
        ({"eos_token_id": (1, 2.0)}, ["eos_token_id", "(1, 2.0)"]),
        ({"pad_token_id": False}, ["pad_token_id", "False"]),
        ({"rope_scaling": "linear"}, ["rope_scaling must be None, a dict or a RopeScaling"]),
        ({"partial_rotary_factor": "0.5"}, ["partial_rotary_factor", "'0.5'"]),
        ({"family": 3}, ["family must be one of"]),
        ({"dtype": ["float32"]}, ["dtype must be one of"]),
    ],
)
def test_bad_model_config_values(change: dict, words: list[str]):
    raises(lambda: ModelConfig(**{**BASE, **change}), *words)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_integer_tensor_in_a_float_checkpoint(tmp_path: Path, glm_ckpt, dtype: torch.dtype):
    config, state = glm_ckpt
    name = "model.layers.1.mlp.down_proj.weight"
    state = {**state, name: torch.ones_like(state[name]).to(dtype)}
    path = write_ckpt(tmp_path / "c", config, state)
    raises(lambda: lmforge.load_pretrained(path), name, str(dtype).removeprefix("torch."), "floating point")
    raises(lambda: lmforge.load_pretrained(path, dtype="float32"), name, str(dtype).removeprefix("torch."))


# --- special token ids outside the vocabulary (GLM's defaults with a small vocabulary) ----------------------
@pytest.mark.parametrize("model_type", ["glm", "glm4"])
@pytest.mark.parametrize("pad", [None, 151329])
def test_glm_default_special_ids_with_a_small_vocab(tmp_path: Path, monkeypatch, capsys, model_type: str, pad):
    """transformers' GlmConfig/Glm4Config defaults (eos 151329, 151336, 151338) in a 300-token checkpoint
    saved by transformers. transformers cannot build a model whose pad_token_id 151329 lies outside the
    embedding (nn.Embedding refuses the padding_idx), so the pad=151329 case is that checkpoint with the
    class-default pad_token_id written back into config.json: lmforge loads it too, with the same logits."""
    import transformers
    from conftest import TINY, load_hf, randomize_

    monkeypatch.setattr(lmforge.errors, "_warned", set())
    cfg = transformers.CONFIG_MAPPING[model_type](**TINY, head_dim=16, pad_token_id=None)
    assert cfg.eos_token_id == [151329, 151336, 151338]  # the class default, not set here
    torch.manual_seed(0)
    hf = randomize_(transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")).eval()
    hf.save_pretrained(tmp_path / "ckpt")
    if pad is not None:
        raw = json.loads((tmp_path / "ckpt" / "config.json").read_text())
        (tmp_path / "ckpt" / "config.json").write_text(json.dumps({**raw, "pad_token_id": pad}))
    else:
        hf = load_hf(tmp_path / "ckpt")  # transformers' own reading of the directory
    capsys.readouterr()
    model = lmforge.load_pretrained(tmp_path / "ckpt")
    lmforge.load_pretrained(tmp_path / "ckpt")
    err = capsys.readouterr().err
    assert err.count("lmforge: warning: ") == 1 and "eos_token_id 151329, 151336, 151338" in err, err
    assert ("pad_token_id 151329" in err) == (pad is not None)
    c = model.config
    assert c.eos_token_id == (151329, 151336, 151338) and c.pad_token_id == pad  # kept, as transformers keeps them
    assert c.usable_eos_token_ids == () and model.embed.padding_idx is None

    ids = torch.randint(0, 300, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(input_ids=ids, use_cache=False).logits
        assert (model(ids) - expected).abs().max().item() < 1e-5
        hf_out = hf.generate(ids[:1], max_new_tokens=8, do_sample=False, pad_token_id=0)[0, ids.shape[1] :]
    assert lmforge.generate(model, ids[0].tolist(), max_new_tokens=8) == hf_out.tolist()

    lmforge.save_pretrained(model, tmp_path / "resaved")  # written back unchanged
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert (resaved["eos_token_id"], resaved["pad_token_id"]) == ([151329, 151336, 151338], pad)


def test_fresh_model_from_a_preset_drops_ids_outside_the_data_vocab(tmp_path: Path):
    """pretrain's build_model: glm-4-9b's pad_token_id 151329 means nothing in a 300-token vocabulary."""
    from lmforge.train.pretrain import build_model

    class Shards:
        vocab_size, eos_token_id = 300, 3

    config = ModelConfig.from_preset("tiny-glm4").to_hf()
    config.update(pad_token_id=151329, bos_token_id=299)
    (tmp_path / "glm.json").write_text(json.dumps(config))
    model = build_model(str(tmp_path / "glm.json"), Shards(), None, seed=0)
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (None, 299, (3,))


# --- data files ---------------------------------------------------------------------------------------------
def test_jsonl_not_utf8_names_file_and_line(tmp_path: Path):
    from lmforge.jsonl import read_jsonl

    path = tmp_path / "chat.jsonl"
    path.write_bytes(b'{"messages": []}\r\n\n{"messages": [{"role": "user", "content": "caf\xe9"}]}\n')
    msg = raises(lambda: read_jsonl(path), f"{path}:3: not valid UTF-8", "0xe9", "re-encode")
    assert "\n" not in msg
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n{"b": "\xc3\xa9"}\n')  # a BOM, then valid UTF-8
    assert read_jsonl(path) == [(1, {"a": 1}), (2, {"b": "é"})]
    raises(lambda: read_jsonl(tmp_path), "is a directory", "JSONL file")


def test_corpus_jsonl_not_utf8_cli(tmp_path: Path, capsys):
    from lmforge.cli import main

    (tmp_path / "corpus.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe bad"}\n')
    argv = ["tokenizer", "train", str(tmp_path / "corpus.jsonl"), "--out", str(tmp_path / "tok"), "--vocab-size", "300"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"lmforge tokenizer: error: {tmp_path / 'corpus.jsonl'}:2: not valid UTF-8 (byte 0xff")


def test_data_that_is_not_a_prepared_dataset_cli(tmp_path: Path, capsys):
    from lmforge.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("some text")
    cases = [
        (corpus, ["is not a `lmforge prepare` output", "no index.json", f"lmforge prepare {corpus} --tokenizer"]),
        (corpus / "a.txt", ["is a file", f"lmforge prepare {corpus / 'a.txt'} --tokenizer"]),
        (tmp_path / "nope", ["does not exist", "lmforge prepare"]),
    ]
    for data, words in cases:
        argv = ["pretrain", "--model", "tiny-llama", "--data", str(data), "--out", str(tmp_path / "run")]
        assert main(argv) == 2, data
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("lmforge pretrain: error: "), err
        for word in words:
            assert word in err, (word, err)
    assert not (tmp_path / "run").exists()


# --- a closed stdout -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("launcher", list(LAUNCHERS))
def test_closed_stdout_stops_quietly(launcher: str):
    """The reader is gone before lmforge writes (closed right after the start): no traceback, 128 + SIGPIPE."""
    proc = subprocess.Popen([*LAUNCHERS[launcher], "info", "--list"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141, err
    assert err == ""


def test_pipe_into_head():
    out = subprocess.run(
        f"set -o pipefail; {sys.executable} -m lmforge info --list | head -1",
        shell=True,
        executable="/bin/bash",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stderr == "" and out.returncode in (0, 141), out.stderr
    assert len(out.stdout.splitlines()) == 1 and out.stdout.split()[0] in lmforge.list_presets()
