"""Presets against REFERENCE.md section 2: exact parameter counts, the closed form, `lmforge info`, and
the HF config round trip. Everything is counted on the meta device: no memory is allocated."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import lmforge
from lmforge import ModelConfig
from lmforge.cli import main as cli_main
from lmforge.hf_config import config_from_hf, config_to_hf
from lmforge.info import count_parameters

# REFERENCE.md section 2: preset -> (hidden, ffn, layers, heads, kv, head_dim, vocab, theta, llama3 factor,
# eps, tied, qkv bias, rotary fraction, params)
TABLE = {
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 64, 128256, 5e5, 32, 1e-5, True, False, 1, 1_235_814_400),
    "llama-3.2-3b": (3072, 8192, 28, 24, 8, 128, 128256, 5e5, 32, 1e-5, True, False, 1, 3_212_749_824),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128, 128256, 5e5, 8, 1e-5, False, False, 1, 8_030_261_248),
    "llama-3-70b": (8192, 28672, 80, 64, 8, 128, 128256, 5e5, None, 1e-5, False, False, 1, 70_553_706_496),
    "qwen2.5-0.5b": (896, 4864, 24, 14, 2, 64, 151936, 1e6, None, 1e-6, True, True, 1, 494_032_768),
    "qwen2.5-1.5b": (1536, 8960, 28, 12, 2, 128, 151936, 1e6, None, 1e-6, True, True, 1, 1_543_714_304),
    "qwen2.5-3b": (2048, 11008, 36, 16, 2, 128, 151936, 1e6, None, 1e-6, True, True, 1, 3_085_938_688),
    "qwen2.5-7b": (3584, 18944, 28, 28, 4, 128, 152064, 1e6, None, 1e-6, False, True, 1, 7_615_616_512),
    "qwen2.5-14b": (5120, 13824, 48, 40, 8, 128, 152064, 1e6, None, 1e-5, False, True, 1, 14_770_033_664),
    "qwen2.5-32b": (5120, 27648, 64, 40, 8, 128, 152064, 1e6, None, 1e-5, False, True, 1, 32_763_876_352),
    "qwen2.5-72b": (8192, 29568, 80, 64, 8, 128, 152064, 1e6, None, 1e-5, False, True, 1, 72_706_203_648),
    "glm-4-9b": (4096, 13696, 40, 32, 2, 128, 151552, 1e4, None, 1.5625e-7, False, True, 0.5, 9_399_951_360),
    "glm-4-9b-0414": (4096, 13696, 40, 32, 2, 128, 151552, 1e4, None, 1e-5, False, True, 0.5, 9_400_279_040),
    "glm-4-32b-0414": (6144, 23040, 61, 48, 2, 128, 151552, 1e4, None, 1e-5, False, False, 0.5, 32_566_081_536),
}
# REFERENCE.md: max positions per published checkpoint
MAX_POS = {
    "llama-3.2-1b": 131072,
    "llama-3.2-3b": 131072,
    "llama-3.1-8b": 131072,
    "llama-3-70b": 8192,
    "qwen2.5-0.5b": 32768,
    "qwen2.5-3b": 32768,
    "qwen2.5-1.5b": 131072,
    "qwen2.5-7b": 131072,
    "qwen2.5-14b": 131072,
    "qwen2.5-32b": 131072,
    "qwen2.5-72b": 131072,
    "glm-4-9b": 8192,
    "glm-4-9b-0414": 32768,
    "glm-4-32b-0414": 32768,
}
TINY = ["tiny-llama", "tiny-qwen2", "tiny-glm", "tiny-glm4"]


def closed_form(c: ModelConfig) -> tuple[int, int]:
    """REFERENCE.md section 2: (total, non-embedding) from the per-layer formula."""
    h, H, K, d, I, V, L = (
        c.hidden_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.intermediate_size,
        c.vocab_size,
        c.num_layers,
    )
    n_norms = 4 if c.family == "glm4" else 2
    per_layer = h * H * d + 2 * h * K * d + H * d * h + ((H * d + 2 * K * d) if c.qkv_bias else 0)
    per_layer += 3 * h * I + n_norms * h
    non_embedding = L * per_layer + h
    return non_embedding + V * h + (0 if c.tie_embeddings else V * h), non_embedding


def info_json(capsys, *args: str) -> dict:
    assert cli_main(["info", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", list(TABLE))
def test_preset_matches_reference_table(name: str):
    h, ffn, layers, heads, kv, d, vocab, theta, llama3, eps, tied, bias, frac, params = TABLE[name]
    c = ModelConfig.from_preset(name)
    got = (
        c.hidden_size,
        c.intermediate_size,
        c.num_layers,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.vocab_size,
        c.rope_theta,
        c.norm_eps,
        c.tie_embeddings,
        c.qkv_bias,
        c.partial_rotary_factor,
        c.max_position_embeddings,
    )
    assert got == (h, ffn, layers, heads, kv, d, vocab, theta, eps, tied, bias, frac, MAX_POS[name])
    if llama3 is None:
        assert c.rope_scaling is None
    else:
        s = c.rope_scaling
        assert (s.rope_type, s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings) == (
            "llama3",
            llama3,
            1.0,
            4.0,
            8192,
        )
    assert c.rope_interleaved == (c.family in ("glm", "glm4"))
    assert c.post_sublayer_norms == (c.family == "glm4")
    assert c.source.startswith("https://huggingface.co/")
    assert count_parameters(c)[0] == params


def test_non_embedding_counts():
    assert count_parameters(ModelConfig.from_preset("qwen2.5-0.5b"))[1] == 357_898_112
    assert count_parameters(ModelConfig.from_preset("llama-3.1-8b"))[1] == 6_979_588_096


@pytest.mark.parametrize("name", list(TABLE) + TINY)
def test_closed_form_agrees_with_count(name: str):
    c = ModelConfig.from_preset(name)
    assert closed_form(c) == count_parameters(c)


@pytest.mark.parametrize("name", list(TABLE) + TINY)
def test_count_agrees_with_transformers(name: str):
    """transformers, instantiated on the meta device from lmforge's config.json, has as many parameters."""
    import transformers
    from transformers import AutoModelForCausalLM

    hf = dict(config_to_hf(ModelConfig.from_preset(name)))
    cfg = transformers.CONFIG_MAPPING[hf.pop("model_type")](**hf)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(ModelConfig.from_preset(name))[0]


def test_list_presets_has_every_name():
    names = lmforge.list_presets()
    assert set(TABLE) | set(TINY) <= set(names)
    assert len(names) == len(set(names))
    for name in names:
        assert isinstance(ModelConfig.from_preset(name), ModelConfig)


@pytest.mark.parametrize("name", list(TABLE) + TINY)
def test_hf_config_round_trip(name: str):
    c = ModelConfig.from_preset(name)
    hf = config_to_hf(c)
    assert json.loads(json.dumps(hf)) == hf  # plain JSON
    assert config_from_hf(hf) == c
    assert ModelConfig.from_hf(hf) == c
    assert ModelConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize("name", list(TABLE))
@pytest.mark.parametrize("seq_len", [2048, 4096])
def test_info_json(capsys, name: str, seq_len: int):
    c = ModelConfig.from_preset(name)
    stats = info_json(capsys, name, "--seq-len", str(seq_len))
    params = TABLE[name][-1]
    _, non_embedding = closed_form(c)
    L, H, K, d = c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim
    assert stats["params"] == params
    assert stats["non_embedding_params"] == non_embedding
    assert stats["kv_cache_bytes_per_token"] == 2 * L * K * d * 2  # K and V, bf16
    assert stats["flops_per_token"] == 6 * non_embedding + 12 * L * H * d * seq_len


def test_info_json_known_values(capsys):
    stats = info_json(capsys, "qwen2.5-0.5b")  # default --seq-len 2048
    assert stats["non_embedding_params"] == 357_898_112
    assert stats["kv_cache_bytes_per_token"] == 2 * 24 * 2 * 64 * 2 == 12_288
    assert stats["flops_per_token"] == 6 * 357_898_112 + 12 * 24 * 14 * 64 * 2048
    stats = info_json(capsys, "llama-3.1-8b", "--seq-len", "8192")
    assert stats["kv_cache_bytes_per_token"] == 131_072  # 128 KiB per token
    assert stats["flops_per_token"] == 6 * 6_979_588_096 + 12 * 32 * 32 * 128 * 8192


def test_info_table_and_list(capsys):
    assert cli_main(["info", "glm-4-9b"]) == 0
    out = capsys.readouterr().out
    assert "9,399,951,360" in out
    assert cli_main(["info", "--list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["name"]: r["params"] for r in rows if r["name"] in TABLE} == {k: v[-1] for k, v in TABLE.items()}


def test_info_reads_a_checkpoint_directory(capsys, tmp_path):
    from conftest import make_hf_model

    hf = make_hf_model("glm4", tmp_path / "ckpt", head_dim=16)
    stats = info_json(capsys, str(tmp_path / "ckpt"))
    assert stats["params"] == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize(
    "launcher",
    [
        [sys.executable, "-m", "lmforge.cli"],
        [sys.executable, "-c", "import sys; from lmforge.cli import main; sys.exit(main())"],  # the console script
    ],
    ids=["python-m", "entry-point"],
)
def test_info_json_subprocess(launcher: list[str]):
    """`lmforge info` run as a user runs it: a separate process, JSON on stdout."""
    out = subprocess.run(
        [*launcher, "info", "llama-3.2-1b", "--json", "--seq-len", "1024"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stdout)
    assert {"params", "non_embedding_params", "kv_cache_bytes_per_token", "flops_per_token"} <= set(stats)
    assert stats["params"] == 1_235_814_400
    assert stats["flops_per_token"] == 6 * 973_146_112 + 12 * 16 * 32 * 64 * 1024
