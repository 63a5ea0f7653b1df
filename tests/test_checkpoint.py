"""HF checkpoint interop: lmforge.save_pretrained <-> transformers, sharding, dtypes, foreign files,
atomic saves and memory-mapped loading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import hf_logits, load_hf, make_hf_model, max_diff, our_logits, random_ids, randomize_
from safetensors.torch import load_file

import lmforge
import lmforge.checkpoint.hf
from lmforge import ModelConfig, RopeScaling, Transformer

FP32_ATOL = 1e-5


def tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory (single file or shards)."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        part = load_file(f)
        assert not set(part) & set(out), f"tensor stored twice in {path}"
        out.update(part)
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), name


def random_model(config: ModelConfig, seed: int = 0, dtype: torch.dtype | None = None) -> Transformer:
    model = randomize_(Transformer(config), seed).eval()
    return model if dtype is None else model.to(dtype)


def load_hf_checked(path: Path, dtype: torch.dtype | str = torch.float32) -> torch.nn.Module:
    """transformers' model for `path`, asserting that every tensor was found and used."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="sdpa", dtype=dtype, output_loading_info=True
    )
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    return model.eval()


# --- lmforge -> transformers ------------------------------------------------------------------------
LMFORGE_CONFIGS = {
    "tiny-llama": ModelConfig.from_preset("tiny-llama"),  # tied, llama3 scaling
    "tiny-qwen2": ModelConfig.from_preset("tiny-qwen2"),  # tied, qkv bias
    "tiny-glm": ModelConfig.from_preset("tiny-glm"),  # partial interleaved rope, fused gate/up
    "tiny-glm4": ModelConfig.from_preset("tiny-glm4"),  # + post-sublayer norms
    "llama-biases-linear": ModelConfig.from_preset("tiny-llama").replace(
        tie_embeddings=False,
        qkv_bias=True,
        o_bias=True,
        mlp_bias=True,
        rope_scaling=RopeScaling("linear", factor=2.0),
    ),
    "llama-mqa-yarn": ModelConfig.from_preset("tiny-llama").replace(
        num_kv_heads=1,
        head_dim=24,
        rope_scaling=RopeScaling("yarn", factor=4.0, original_max_position_embeddings=32, beta_fast=16.0),
    ),
    "llama-longrope": ModelConfig.from_preset("tiny-llama").replace(
        rope_scaling=RopeScaling(
            "longrope",
            original_max_position_embeddings=32,
            short_factor=tuple(1.0 + 0.1 * i for i in range(8)),
            long_factor=tuple(2.0 + 0.5 * i for i in range(8)),
        )
    ),
    "llama-dynamic": ModelConfig.from_preset("tiny-llama").replace(
        max_position_embeddings=32, rope_scaling=RopeScaling("dynamic", factor=2.0)
    ),
    "qwen2-untied-mha": ModelConfig.from_preset("tiny-qwen2").replace(tie_embeddings=False, num_kv_heads=4),
    "glm4-nobias-partial0.25-yarn": ModelConfig.from_preset("tiny-glm4").replace(
        qkv_bias=False,
        partial_rotary_factor=0.25,
        rope_scaling=RopeScaling("yarn", factor=2.0, original_max_position_embeddings=64),
    ),
}


@pytest.mark.parametrize("name", list(LMFORGE_CONFIGS))
def test_save_pretrained_loads_in_transformers(tmp_path: Path, name: str):
    config = LMFORGE_CONFIGS[name]
    model = random_model(config)
    out = lmforge.save_pretrained(model, tmp_path / "ckpt")
    assert out == tmp_path / "ckpt"
    assert {p.name for p in out.iterdir()} == {"config.json", "generation_config.json", "model.safetensors"}
    hf = load_hf_checked(out)
    assert hf.config.model_type == config.family
    assert hf.config.tie_word_embeddings == config.tie_embeddings
    # 37 tokens: beyond max_position_embeddings (dynamic) and the original length (longrope, yarn)
    ids = random_ids(2, 37, vocab=config.vocab_size)
    ref = hf_logits(hf, ids)
    assert max_diff(our_logits(model, ids), ref) <= FP32_ATOL
    assert ref.std() > 0.1
    if config.tie_embeddings:
        assert "lm_head.weight" not in tensors(out)

    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(out)
    eos = gen.eos_token_id
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    assert tuple(eos) == config.eos_token_id
    assert gen.pad_token_id == config.pad_token_id


# --- transformers -> lmforge -> transformers -----------------------------------------------------------
HF_CONFIGS = {
    "llama-untied-biases": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "llama-tied-llama3": (
        "llama",
        {
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    "qwen2": ("qwen2", {}),
    "qwen2-tied-yarn": (
        "qwen2",
        {
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 1e6,
                "factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
    ),
    "glm": ("glm", {"head_dim": 16}),
    "glm-partial0.25": ("glm", {"head_dim": 32, "partial_rotary_factor": 0.25}),
    "glm4": ("glm4", {"head_dim": 16}),
    "glm4-nobias": ("glm4", {"head_dim": 16, "attention_bias": False}),
}


@pytest.mark.parametrize("name", list(HF_CONFIGS))
def test_transformers_lmforge_transformers_is_identity(tmp_path: Path, name: str):
    from transformers import AutoConfig

    model_type, kwargs = HF_CONFIGS[name]
    make_hf_model(model_type, tmp_path / "hf", **kwargs)
    model = lmforge.load_pretrained(tmp_path / "hf")
    lmforge.save_pretrained(model, tmp_path / "again")
    original, again = tensors(tmp_path / "hf"), tensors(tmp_path / "again")
    assert_same_tensors(original, again)
    if model_type in ("glm", "glm4"):
        assert "model.layers.0.mlp.gate_up_proj.weight" in again  # fused, as GLM stores it
        assert not any("gate_proj" in k or ".up_proj" in k for k in again)
    # transformers reads both config.json files as the same architecture
    a, b = AutoConfig.from_pretrained(tmp_path / "hf"), AutoConfig.from_pretrained(tmp_path / "again")
    for key in (
        "model_type",
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "tie_word_embeddings",
        "attention_bias",
        "mlp_bias",
        "max_position_embeddings",
        "pad_token_id",
        "eos_token_id",
        "bos_token_id",
        "rope_parameters",
    ):
        assert getattr(a, key, None) == getattr(b, key, None), key

    # Qwen2 configs have no head_dim field; lmforge writes the implied one
    def head_dim(c):
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    assert head_dim(a) == head_dim(b)


def test_bf16_checkpoint_round_trip_keeps_dtype_and_bits(tmp_path: Path):
    hf = make_hf_model("glm4", head_dim=16).to(torch.bfloat16)
    hf.save_pretrained(tmp_path / "hf")
    model = lmforge.load_pretrained(tmp_path / "hf")  # dtype=None keeps the stored dtype
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    lmforge.save_pretrained(model, tmp_path / "again")
    assert_same_tensors(tensors(tmp_path / "hf"), tensors(tmp_path / "again"))
    assert json.loads((tmp_path / "again" / "config.json").read_text())["dtype"] == "bfloat16"


# --- sharded checkpoints ------------------------------------------------------------------------------
def test_lmforge_writes_shards_that_transformers_loads(tmp_path: Path):
    config = LMFORGE_CONFIGS["tiny-glm4"]
    model = random_model(config)
    out = lmforge.save_pretrained(model, tmp_path / "sharded", max_shard_size="50KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3
    assert not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    stored = tensors(out)
    assert set(index["weight_map"]) == set(stored)
    for shard in shards:  # a shard exceeds the limit only when it holds one tensor bigger than the limit
        part = load_file(shard)
        assert len(part) == 1 or sum(t.numel() * t.element_size() for t in part.values()) <= 50_000
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())

    hf = load_hf_checked(out)
    ids = random_ids(2, 37, vocab=config.vocab_size)
    assert max_diff(our_logits(model, ids), hf_logits(hf, ids)) <= FP32_ATOL
    # and lmforge reads its own shards back to the same weights
    back = lmforge.load_pretrained(out)
    assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_lmforge_loads_shards_written_by_transformers(tmp_path: Path):
    hf = make_hf_model("qwen2", tie_word_embeddings=False)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="50KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "hf").glob("*.safetensors"))) > 3
    ours = lmforge.load_pretrained(tmp_path / "hf")
    ids = random_ids(3, 37)
    assert max_diff(our_logits(ours, ids), hf_logits(hf, ids)) <= FP32_ATOL


# --- dtype conversion on save ---------------------------------------------------------------------------
def test_save_converts_dtype(tmp_path: Path):
    config = LMFORGE_CONFIGS["tiny-qwen2"]
    model = random_model(config)  # fp32
    out = lmforge.save_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16)
    stored = tensors(out)
    assert {t.dtype for t in stored.values()} == {torch.bfloat16}
    expected = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert torch.equal(stored["model.embed_tokens.weight"], expected["embed.weight"])
    assert torch.equal(stored["model.layers.1.self_attn.q_proj.bias"], expected["layers.1.attn.q_proj.bias"])
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    # the model being saved is untouched
    assert all(p.dtype == torch.float32 for p in model.parameters())

    # transformers with dtype="auto" follows config.json; both sides then run the same bf16 weights
    hf = load_hf_checked(out, dtype="auto")
    assert hf.model.embed_tokens.weight.dtype == torch.bfloat16
    ours = lmforge.load_pretrained(out)
    assert ours.embed.weight.dtype == torch.bfloat16
    ids = random_ids(2, 37, vocab=config.vocab_size)
    assert max_diff(our_logits(ours, ids), hf_logits(hf, ids)) == 0.0  # same bf16 ops, same bits today

    # and back up to fp32: the stored values are the bf16 ones, exactly
    up = lmforge.save_pretrained(ours, tmp_path / "fp32", dtype=torch.float32)
    assert all(torch.equal(t, stored[k].float()) for k, t in tensors(up).items())
    assert json.loads((up / "config.json").read_text())["dtype"] == "float32"


def test_load_with_dtype_converts(tmp_path: Path):
    make_hf_model("llama", tmp_path / "hf")
    stored = tensors(tmp_path / "hf")
    model = lmforge.load_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.embed.weight, stored["model.embed_tokens.weight"].to(torch.bfloat16))


# --- foreign files ----------------------------------------------------------------------------------------
def test_save_keeps_foreign_files_and_drops_stale_weights(tmp_path: Path):
    config = LMFORGE_CONFIGS["tiny-llama"]
    target = tmp_path / "ckpt"
    # a sharded save first, then the user adds tokenizer files and notes
    lmforge.save_pretrained(random_model(config, seed=1), target, max_shard_size="50KB")
    foreign = {
        "tokenizer.json": '{"version": "1.0", "model": {}}',
        "tokenizer_config.json": '{"model_max_length": 256}',
        "README.md": "# my model\n",
    }
    for name, text in foreign.items():
        (target / name).write_text(text)
    (target / "assets").mkdir()
    (target / "assets" / "notes.txt").write_text("keep me")

    model = random_model(config, seed=2)
    lmforge.save_pretrained(model, target)  # now a single file
    for name, text in foreign.items():
        assert (target / name).read_text() == text
    assert (target / "assets" / "notes.txt").read_text() == "keep me"
    # the old shards and index are gone (a loader would otherwise prefer the stale index)
    assert not (target / "model.safetensors.index.json").exists()
    assert not list(target.glob("model-*-of-*.safetensors"))
    assert (target / "model.safetensors").is_file()
    hf = load_hf_checked(target)
    ids = random_ids(1, 21, vocab=config.vocab_size)
    assert max_diff(our_logits(model, ids), hf_logits(hf, ids)) <= FP32_ATOL


def test_resave_in_place_from_memory_mapped_weights(tmp_path: Path):
    """Loading maps the files; saving back into the same directory (here with a dtype change) must not
    read from files it is replacing."""
    hf = make_hf_model("glm", tmp_path / "ckpt", head_dim=16)
    (tmp_path / "ckpt" / "tokenizer.json").write_text("{}")
    stored = tensors(tmp_path / "ckpt")
    model = lmforge.load_pretrained(tmp_path / "ckpt")
    lmforge.save_pretrained(model, tmp_path / "ckpt", dtype=torch.bfloat16, max_shard_size="50KB")
    again = tensors(tmp_path / "ckpt")
    assert_same_tensors(again, {k: v.to(torch.bfloat16) for k, v in stored.items()})
    assert (tmp_path / "ckpt" / "tokenizer.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    hf16 = load_hf_checked(tmp_path / "ckpt", dtype=torch.bfloat16)
    ids = random_ids(2, 19)
    assert max_diff(our_logits(lmforge.load_pretrained(tmp_path / "ckpt"), ids), hf_logits(hf16, ids)) == 0.0
    assert max_diff(hf_logits(hf16, ids), hf_logits(hf, ids)) < 0.1  # the same model, rounded


def test_cli_convert_dtype_and_shards(tmp_path: Path, capsys):
    from lmforge.cli import main

    hf = make_hf_model("llama", tmp_path / "hf", tie_word_embeddings=True)
    argv = ["convert", str(tmp_path / "hf"), str(tmp_path / "out"), "--dtype", "bf16", "--max-shard-size", "50KB"]
    assert main(argv) == 0
    assert str(tmp_path / "out") in capsys.readouterr().out
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert {t.dtype for t in tensors(tmp_path / "out").values()} == {torch.bfloat16}
    hf16 = load_hf_checked(tmp_path / "out", dtype="auto")
    assert hf16.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(hf16.model.embed_tokens.weight, hf.model.embed_tokens.weight.to(torch.bfloat16))


def test_save_writes_extra_files(tmp_path: Path):
    model = random_model(LMFORGE_CONFIGS["tiny-qwen2"])
    out = lmforge.save_pretrained(model, tmp_path / "ckpt", extra_files={"chat_template.jinja": "{{ messages }}"})
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"


# --- atomic saves -------------------------------------------------------------------------------------------
def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _crashing_writer(monkeypatch, crash_on_call: int, exc: BaseException):
    """Make lmforge.checkpoint.hf.write_safetensors write half of a file and then raise, on call n."""
    real = lmforge.checkpoint.hf.write_safetensors
    calls = {"n": 0}

    def writer(file, tensors, metadata=None):
        calls["n"] += 1
        if calls["n"] == crash_on_call:
            real(file, tensors, metadata)
            data = Path(file).read_bytes()
            Path(file).write_bytes(data[: len(data) // 2])
            raise exc
        return real(file, tensors, metadata)

    monkeypatch.setattr(lmforge.checkpoint.hf, "write_safetensors", writer)
    return calls


@pytest.mark.parametrize(
    "shard_size, crash_on_call, exc",
    [
        ("5GB", 1, OSError("disk full")),
        ("50KB", 3, OSError("disk full")),  # several shards already written
        ("50KB", 2, KeyboardInterrupt()),  # Ctrl-C is not an Exception
    ],
)
def test_crash_mid_save_leaves_previous_checkpoint_intact(
    tmp_path: Path, monkeypatch, shard_size: str, crash_on_call: int, exc: BaseException
):
    config = LMFORGE_CONFIGS["tiny-glm"]
    target = tmp_path / "ckpt"
    good = random_model(config, seed=1)
    lmforge.save_pretrained(good, target)
    (target / "tokenizer.json").write_text("{}")
    before = _snapshot(target)

    calls = _crashing_writer(monkeypatch, crash_on_call, exc)
    with pytest.raises(type(exc)):
        lmforge.save_pretrained(random_model(config, seed=2), target, max_shard_size=shard_size)
    assert calls["n"] == crash_on_call
    monkeypatch.undo()

    assert _snapshot(target) == before  # byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directory left behind
    hf = load_hf_checked(target)
    ids = random_ids(1, 21, vocab=config.vocab_size)
    assert max_diff(our_logits(lmforge.load_pretrained(target), ids), hf_logits(hf, ids)) <= FP32_ATOL
    assert max_diff(our_logits(good, ids), hf_logits(hf, ids)) <= FP32_ATOL


def test_crash_on_first_save_creates_nothing(tmp_path: Path, monkeypatch):
    _crashing_writer(monkeypatch, 1, OSError("disk full"))
    with pytest.raises(OSError):
        lmforge.save_pretrained(random_model(LMFORGE_CONFIGS["tiny-qwen2"]), tmp_path / "new")
    assert list(tmp_path.iterdir()) == []


# --- loading: memory-mapped, no copies ------------------------------------------------------------------------
def _file_mappings(file: Path) -> list[tuple[int, int]]:
    target = str(file.resolve())
    spans = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].strip() == target:
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                spans.append((lo, hi))
    return spans


def test_load_memory_maps_weights(tmp_path: Path):
    make_hf_model("glm4", tmp_path / "hf", head_dim=16)
    file = tmp_path / "hf" / "model.safetensors"
    stored = load_file(file)
    model = lmforge.load_pretrained(tmp_path / "hf")

    # the model equals the file ...
    again = lmforge.checkpoint.hf_state_dict(model)
    assert_same_tensors(stored, dict(again))
    # ... and every parameter lives in a mapping of the file (no copy in anonymous memory); GLM's fused
    # gate_up_proj is split into two views of the same mapped tensor
    spans = _file_mappings(file)
    assert spans, "model.safetensors is not memory-mapped"
    params = dict(model.named_parameters())
    outside = [n for n, p in params.items() if not any(lo <= p.data_ptr() < hi for lo, hi in spans)]
    assert outside == []
    # copy-on-write: changing a loaded weight in place does not write through to the checkpoint
    with torch.no_grad():
        model.layers[0].attn.q_proj.weight.add_(1.0)
    assert torch.equal(
        load_file(file)["model.layers.0.self_attn.q_proj.weight"], stored["model.layers.0.self_attn.q_proj.weight"]
    )


def test_load_with_conversion_copies(tmp_path: Path):
    make_hf_model("llama", tmp_path / "hf")
    file = tmp_path / "hf" / "model.safetensors"
    model = lmforge.load_pretrained(tmp_path / "hf", dtype=torch.bfloat16)
    spans = _file_mappings(file)
    assert not any(lo <= p.data_ptr() < hi for p in model.parameters() for lo, hi in spans)


def test_tied_checkpoint_with_redundant_lm_head_loads(tmp_path: Path):
    """Some tied checkpoints store lm_head.weight anyway (equal to the embedding): it is not an error."""
    from safetensors.torch import save_file

    hf = make_hf_model("llama", tmp_path / "hf", tie_word_embeddings=True)
    file = tmp_path / "hf" / "model.safetensors"
    state = load_file(file)
    assert "lm_head.weight" not in state
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, file, metadata={"format": "pt"})
    ours = lmforge.load_pretrained(tmp_path / "hf")
    assert ours.lm_head is None
    ids = random_ids(2, 19)
    assert max_diff(our_logits(ours, ids), hf_logits(hf, ids)) <= FP32_ATOL


def test_load_to_explicit_device_and_fp32(tmp_path: Path):
    hf = make_hf_model("qwen2", tmp_path / "hf")
    ours = lmforge.load_pretrained(str(tmp_path / "hf"), dtype=torch.float32, device="cpu")
    assert not ours.training
    ids = random_ids(2, 19)
    assert max_diff(our_logits(ours, ids), hf_logits(hf, ids)) <= FP32_ATOL


# --- edge cases found in review ------------------------------------------------------------------------
def test_save_into_current_directory(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = random_model(ModelConfig.from_preset("tiny-llama"))
    lmforge.save_pretrained(model, ".")
    assert (tmp_path / "config.json").is_file()
    ids = random_ids(2, 9, vocab=512)
    assert max_diff(our_logits(lmforge.load_pretrained(tmp_path), ids), our_logits(model, ids)) == 0.0


@pytest.mark.parametrize("swap", ["exchange", "two renames"])
def test_failed_final_rename_restores_previous_checkpoint(tmp_path: Path, monkeypatch, swap: str):
    import os

    import lmforge.atomic

    path = tmp_path / "ckpt"
    first = random_model(ModelConfig.from_preset("tiny-qwen2"), seed=1)
    lmforge.save_pretrained(first, path)
    before = tensors(path)
    real_rename = os.rename
    calls = []

    def failing_exchange(a, b):
        raise OSError("disk went away")

    def flaky(src, dst):
        calls.append((src, dst))
        if ".partial-" in Path(src).name:  # the rename of the finished temp dir onto the target
            raise OSError("disk went away")
        return real_rename(src, dst)

    if swap == "exchange":
        monkeypatch.setattr(lmforge.atomic, "exchange", failing_exchange)
    else:  # a system or filesystem without renameat2(RENAME_EXCHANGE)
        monkeypatch.setattr(lmforge.atomic, "exchange", lambda a, b: False)
        monkeypatch.setattr(lmforge.atomic.os, "rename", flaky)
    with pytest.raises(OSError):
        lmforge.save_pretrained(random_model(ModelConfig.from_preset("tiny-qwen2"), seed=2), path)
    monkeypatch.undo()
    assert_same_tensors(tensors(path), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_tied_checkpoint_with_its_own_head_uses_it_like_transformers(tmp_path: Path):
    from safetensors.torch import save_file

    path = tmp_path / "hf"
    make_hf_model("llama", path, tie_word_embeddings=True)
    state = load_file(path / "model.safetensors")
    state["lm_head.weight"] = torch.randn_like(state["model.embed_tokens.weight"])
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    ids = random_ids(2, 11)
    ours = lmforge.load_pretrained(path)
    assert not ours.config.tie_embeddings
    assert max_diff(our_logits(ours, ids), hf_logits(load_hf(path), ids)) <= FP32_ATOL


def test_single_file_preferred_over_index_like_transformers(tmp_path: Path):
    path = tmp_path / "hf"
    make_hf_model("llama", path, seed=0)
    make_hf_model("llama", seed=1).save_pretrained(tmp_path / "other", max_shard_size="50KB")
    for f in (tmp_path / "other").glob("model*"):
        f.rename(path / f.name)
    ids = random_ids(2, 11)
    assert max_diff(our_logits(lmforge.load_pretrained(path), ids), hf_logits(load_hf(path), ids)) <= FP32_ATOL


def test_loading_does_not_import_dynamo(tmp_path: Path):
    """Building the model must not run initialisers that pull in torch._dynamo (~0.75 s per process)."""
    import subprocess
    import sys

    lmforge.save_pretrained(random_model(ModelConfig.from_preset("tiny-llama")), tmp_path / "m")
    code = (
        f"import sys, lmforge; lmforge.load_pretrained({str(tmp_path / 'm')!r}); print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
