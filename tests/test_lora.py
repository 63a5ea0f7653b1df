"""LoRA: layers, freezing, merging, report numbers, and adapters in PEFT's format checked against `peft`.

Each family's base is a tiny random transformers model saved with save_pretrained and read with
lmforge.load_pretrained. Adapters get random non-zero B so that they change the logits (a fresh adapter
has B = 0 and would pass any comparison). Logits are compared at 1e-5 absolute (they are O(1)).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES, hf_logits, load_hf, make_hf_model, max_diff, our_logits, random_ids
from torch import nn

import lmforge
from lmforge.errors import LmforgeError
from lmforge.finetune import lora as lora_mod
from lmforge.finetune.lora import (
    TARGETS,
    LoraConfig,
    LoraLinear,
    apply_lora,
    load_adapter,
    lora_modules,
    lora_state_dict,
    merge_lora,
    save_adapter,
)
from lmforge.train.optim import build_optimizer

ATOL = 1e-5
ALL = tuple(TARGETS)
# A GLM head_dim must be given (its class default is 128); llama also gets biases on every projection.
EXTRA = {
    "llama": {"attention_bias": True, "mlp_bias": True},
    "qwen2": {},
    "glm": {},
    "glm4": {},
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """family -> a saved tiny random checkpoint of that family (built once per module)."""
    cache: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in cache:
            path = tmp_path_factory.mktemp(f"base-{family}")
            make_hf_model(family, path, seed=1, intermediate_size=96, head_dim=16, **EXTRA[family])
            cache[family] = path
        return cache[family]

    return get


def tiny_model(family: str = "llama", **kw) -> lmforge.Transformer:
    cfg = lmforge.ModelConfig(
        vocab_size=300, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96, **kw
    )
    torch.manual_seed(0)
    return lmforge.Transformer(cfg)


@torch.no_grad()
def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Non-zero B (and a fresh A) for every LoRA layer, so the adapters change the function."""
    gen = torch.Generator().manual_seed(seed)
    for module in lora_modules(model).values():
        module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=gen) * std)
        module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=gen) * std)


def adapted(family: str, base: Path, targets=ALL, r: int = 4, alpha: float = 8.0, seed: int = 0):
    model = lmforge.load_pretrained(base)
    config = LoraConfig(r=r, alpha=alpha, targets=targets)
    apply_lora(model, config, generator=torch.Generator().manual_seed(seed))
    randomize_adapters(model, seed)
    return model.eval(), config


# --- config and layer ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"r": 0}, "rank r must be a positive integer"),
        ({"r": 2.5}, "rank r must be a positive integer"),
        ({"alpha": 0}, "alpha must be a positive number"),
        ({"alpha": float("nan")}, "alpha must be a positive number"),
        ({"dropout": 1.0}, "dropout must be in [0, 1)"),
        ({"dropout": -0.1}, "dropout must be in [0, 1)"),
        ({"targets": ()}, "at least one target"),
        ({"targets": ("q", "qq")}, "q, k, v, o, gate, up, down"),
        ({"targets": ("gate_up",)}, "unknown LoRA target"),
    ],
)
def test_config_rejects_bad_values(kwargs, fragment):
    with pytest.raises(LmforgeError) as e:
        LoraConfig(**kwargs)
    assert fragment in str(e.value)


def test_config_normalises_targets():
    assert LoraConfig(targets=("down", "q", "q")).targets == ("q", "down")
    assert LoraConfig(targets="v, gate").targets == ("v", "gate")
    assert LoraConfig(r=4, alpha=8).scaling == 2.0


def test_lora_linear_wraps_in_place_and_matches_formula():
    torch.manual_seed(0)
    base = nn.Linear(12, 10, bias=True)
    w, b = base.weight, base.bias
    layer = LoraLinear(base, r=3, alpha=6.0, dropout=0.0)
    assert layer.weight is w and layer.bias is b  # the same Parameters, under the same names
    assert list(layer.state_dict()) == ["weight", "bias", "lora_A", "lora_B"]
    assert layer.lora_A.shape == (3, 12) and layer.lora_B.shape == (10, 3)
    assert not layer.lora_B.any()  # PEFT's init: B = 0, so a fresh adapter changes nothing
    bound = 1 / math.sqrt(12)  # kaiming_uniform(a=sqrt(5)) on [r, in] is U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.std() > bound / 4
    x = torch.randn(2, 5, 12)
    assert torch.equal(layer(x), base(x))
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = F.linear(x, w, b) + (x @ layer.lora_A.T @ layer.lora_B.T) * 2.0
    assert max_diff(layer(x), expected) < 1e-5
    merged = layer.merge()
    assert type(merged) is nn.Linear and merged.bias is b and merged.weight.dtype == w.dtype
    assert max_diff(merged(x), layer(x)) < 1e-5


def test_dropout_applies_to_the_lora_input_only_in_training():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(8, 8), r=2, alpha=2.0, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 8)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))  # random masks on the adapter's input


def test_bf16_base_gets_fp32_adapters_and_merges_in_bf16():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(8, 6, dtype=torch.bfloat16), r=2, alpha=4.0)
    assert layer.lora_A.dtype == torch.float32
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    merged = layer.merge()
    assert merged.weight.dtype == torch.bfloat16
    assert max_diff(merged(x), layer(x)) < 0.1  # bf16 rounding of the merged weight


# --- applying, training, merging -------------------------------------------------------------------
def test_apply_lora_report_numbers():
    model = tiny_model(tie_embeddings=True)
    base_names = list(model.state_dict())
    report = apply_lora(model, LoraConfig(r=4, alpha=8, targets=("q", "v", "down")))
    h, I, V, L, H, K, d = 64, 96, 300, 2, 4, 2, 16
    per_layer = h * H * d + 2 * h * K * d + H * d * h + 3 * h * I + 2 * h  # REFERENCE.md section 2
    base = V * h + L * per_layer + h  # tied head counted once
    lora = L * 4 * ((h + H * d) + (h + K * d) + (I + h))  # r * (in + out) for q, v, down
    assert sum(p.numel() for p in model.parameters()) == base + lora
    assert report.modules == 3 * L
    assert report.trainable == lora and report.total == base + lora
    assert report.trainable_percent == pytest.approx(100 * lora / (base + lora))
    assert report.memory_saved_bytes == 12 * (base - lora)  # fp32: gradient + 2 AdamW moments per parameter
    assert "trainable" in str(report)
    # base keys unchanged; only the adapters are trainable
    state = model.state_dict()
    assert [k for k in state if "lora_" not in k] == base_names
    assert set(lora_state_dict(model)) == {
        f"layers.{i}.{TARGETS[t]}.lora_{ab}" for i in range(L) for t in ("q", "v", "down") for ab in "AB"
    }
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(model))


def test_training_changes_only_the_adapters():
    model = tiny_model()
    apply_lora(model, LoraConfig(r=4, alpha=8, targets=ALL), generator=torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    ids = random_ids(4, 24, seed=3)
    model.train()
    losses = []
    for _ in range(5):
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    after = model.state_dict()
    for name, tensor in before.items():
        if "lora_" in name:
            assert not torch.equal(after[name], tensor), f"{name} did not train"
        else:
            assert torch.equal(after[name], tensor), f"{name} changed"  # bit for bit
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_equals_unmerged(family, base_dir):
    model, _ = adapted(family, base_dir(family))
    plain = lmforge.load_pretrained(base_dir(family))
    ids = random_ids(2, 19)
    ours = our_logits(model, ids)
    assert max_diff(ours, our_logits(plain, ids)) > 1e-3  # the adapters matter
    merge_lora(model)
    assert not lora_modules(model)
    assert list(model.state_dict()) == list(plain.state_dict())
    assert all(p.requires_grad for p in model.parameters())
    assert max_diff(our_logits(model, ids), ours) < ATOL


# --- PEFT format -----------------------------------------------------------------------------------
def peft_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(load_hf(base), str(adapter)).eval()
    return hf_logits(model, ids)


@pytest.mark.parametrize(
    "family, targets",
    [(f, ALL) for f in FAMILIES] + [("glm", ("q", "up")), ("glm4", ("gate", "down"))],
)
def test_saved_adapter_loads_in_peft(family, targets, base_dir, tmp_path):
    base = base_dir(family)
    model, config = adapted(family, base, targets)
    out = save_adapter(model, config, tmp_path / "adapter", base_model_name_or_path=str(base))
    ids = random_ids(2, 21, seed=1)
    ours = our_logits(model, ids)
    assert max_diff(ours, our_logits(lmforge.load_pretrained(base), ids)) > 1e-3
    assert max_diff(peft_logits(base, out, ids), ours) < ATOL

    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["bias"] == "none"
    assert (cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (4, 8, 0.0)
    assert cfg["base_model_name_or_path"] == str(base)
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    if "q" in targets:
        assert shapes[f"{q}.lora_A.weight"] == (4, 64) and shapes[f"{q}.lora_B.weight"] == (64, 4)
    fused = "base_model.model.model.layers.1.mlp.gate_up_proj"
    if family in ("glm", "glm4") and {"gate", "up"} & set(targets):
        # one LoRA of rank 2r for both halves, alpha doubled so that alpha / r stays 2
        assert shapes[f"{fused}.lora_A.weight"] == (8, 64) and shapes[f"{fused}.lora_B.weight"] == (192, 8)
        assert cfg["rank_pattern"] == {"gate_up_proj": 8} and cfg["alpha_pattern"] == {"gate_up_proj": 16}
        assert "gate_up_proj" in cfg["target_modules"] and "gate_proj" not in cfg["target_modules"]
    else:
        assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    assert len(shapes) == 2 * 2 * len({"gate_up" if t in ("gate", "up") and "glm" in family else t for t in targets})


def test_per_layer_ranks_are_written_as_patterns(base_dir, tmp_path):
    """Layers with their own rank or alpha (adapters loaded from elsewhere) get rank_pattern / alpha_pattern keys
    that peft matches to exactly those modules."""
    base = base_dir("glm4")
    model, config = adapted("glm4", base, ("q", "v", "gate"))
    gen = torch.Generator().manual_seed(3)
    model.layers[0].attn.q_proj.set_adapter(torch.randn(3, 64, generator=gen), torch.randn(64, 3, generator=gen), 5)
    for layer in model.layers:  # the same rank and alpha in every layer: one key for all of them
        layer.attn.v_proj.set_adapter(torch.randn(6, 64, generator=gen), torch.randn(32, 6, generator=gen), 2)
    out = save_adapter(model, config, tmp_path / "a")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {r"layers\.0\.self_attn\.q_proj": 3, "v_proj": 6, "gate_up_proj": 8}
    assert cfg["alpha_pattern"] == {r"layers\.0\.self_attn\.q_proj": 5, "v_proj": 2, "gate_up_proj": 16}
    ids = random_ids(2, 15, seed=4)
    assert max_diff(peft_logits(base, out, ids), our_logits(model, ids)) < ATOL
    fresh = lmforge.load_pretrained(base)
    load_adapter(fresh, out)
    assert max_diff(our_logits(fresh, ids), our_logits(model, ids)) < ATOL
    assert (fresh.layers[0].attn.q_proj.r, fresh.layers[1].attn.q_proj.r, fresh.layers[1].attn.v_proj.alpha) == (
        3,
        4,
        2,
    )


@pytest.mark.parametrize("family, targets", [("llama", ALL), ("glm", ALL), ("glm4", ("q", "up"))])
def test_save_load_round_trip_is_exact(family, base_dir, tmp_path, targets):
    base = base_dir(family)
    model, config = adapted(family, base, targets)
    save_adapter(model, config, tmp_path / "a")
    fresh = lmforge.load_pretrained(base)
    loaded = load_adapter(fresh, tmp_path / "a")
    assert loaded == config
    want, got = lora_state_dict(model), lora_state_dict(fresh)
    assert list(got) == list(want)
    for name in want:  # GLM's gate and up come back out of the fused module exactly
        assert torch.equal(got[name], want[name]), name
    for name, m in lora_modules(fresh).items():
        assert (m.r, m.alpha) == (4, 8.0), name
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == set(want)


@pytest.mark.parametrize("family", FAMILIES)
def test_load_adapter_written_by_peft(family, base_dir, tmp_path):
    base = base_dir(family)
    glm = family in ("glm", "glm4")
    mlp = ["gate_up_proj"] if glm else ["gate_proj", "up_proj"]
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", *mlp, "down_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={"o_proj": 3, "down_proj": 12},
        task_type="CAUSAL_LM",
    )
    pm = peft.get_peft_model(load_hf(base), config)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:  # a trained adapter: B is no longer zero
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    pm.save_pretrained(tmp_path / "peft")
    ids = random_ids(2, 23, seed=2)
    ref = hf_logits(pm.eval(), ids)

    model = lmforge.load_pretrained(base)
    loaded = load_adapter(model, tmp_path / "peft")
    assert (loaded.r, loaded.alpha, loaded.targets) == (4, 8.0, ALL)
    assert max_diff(our_logits(model.eval(), ids), ref) < ATOL
    assert max_diff(ref, our_logits(lmforge.load_pretrained(base), ids)) > 1e-3
    layer = model.layers[0]
    assert (layer.attn.v_proj.r, layer.attn.o_proj.alpha, layer.mlp.down_proj.alpha) == (2, 3.0, 12.0)
    if glm:  # a general fused adapter: gate and up each get the whole A and their half of B
        gate, up = layer.mlp.gate_proj, layer.mlp.up_proj
        assert gate.r == up.r == 4 and torch.equal(gate.lora_A, up.lora_A)
    # and it saves back into a directory peft reads to the same function
    out = save_adapter(model, loaded, tmp_path / "again")
    assert max_diff(peft_logits(base, out, ids), ref) < ATOL


def test_glm_fused_adapter_at_initialisation_loads_exactly(base_dir, tmp_path):
    """peft's fresh fused adapter (B = 0) is block-diagonal in the trivial way: it loads as two LoRAs."""
    base = base_dir("glm")
    pm = peft.get_peft_model(load_hf(base), peft.LoraConfig(r=4, target_modules=["gate_up_proj"]))
    pm.save_pretrained(tmp_path / "peft")
    model = lmforge.load_pretrained(base)
    load_adapter(model, tmp_path / "peft")
    fused_A = pm.base_model.model.model.layers[0].mlp.gate_up_proj.lora_A["default"].weight
    gate, up = model.layers[0].mlp.gate_proj, model.layers[0].mlp.up_proj
    assert torch.equal(torch.cat([gate.lora_A, up.lora_A]), fused_A)
    assert gate.r == up.r == 2 and gate.scaling == up.scaling == 8 / 4
    ids = random_ids(1, 9)
    assert max_diff(our_logits(model, ids), our_logits(lmforge.load_pretrained(base), ids)) < ATOL


# --- errors and atomic saving ----------------------------------------------------------------------
@pytest.fixture
def good_adapter(base_dir, tmp_path) -> Path:
    model, config = adapted("qwen2", base_dir("qwen2"), ("q", "v"))
    return save_adapter(model, config, tmp_path / "good")


def remove(name: str) -> Callable[[Path], Path]:
    def damage(path: Path) -> Path:
        (path / name).unlink()
        return path

    return damage


def overwrite(name: str, data: bytes) -> Callable[[Path], Path]:
    def damage(path: Path) -> Path:
        (path / name).write_bytes(data)
        return path

    return damage


def edit_config(**changes) -> Callable[[Path], Path]:
    def damage(path: Path) -> Path:
        cfg = json.loads((path / "adapter_config.json").read_text())
        cfg.update(changes)
        (path / "adapter_config.json").write_text(json.dumps(cfg))
        return path

    return damage


@pytest.mark.parametrize(
    "damage, fragment",
    [
        (lambda p: p / "missing", "does not exist"),
        (lambda p: p / "adapter_config.json", "is a file"),
        (remove("adapter_config.json"), "no adapter_config.json"),
        (overwrite("adapter_config.json", b"{oops"), "not valid JSON"),
        (remove("adapter_model.safetensors"), "no adapter_model.safetensors"),
        (overwrite("adapter_model.safetensors", b"\x10\x00" * 9), "truncated or corrupt"),
        (edit_config(peft_type="IA3"), "LoRA adapters only"),
        (edit_config(use_dora=True), "DoRA"),
        (edit_config(use_rslora=True), "use_rslora"),
        (edit_config(bias="all"), "bias 'none' only"),
        (edit_config(modules_to_save=["lm_head"]), "modules_to_save"),
        (edit_config(r=0), "rank r must be a positive integer"),
        (edit_config(alpha_pattern={"q_proj": -1}), "must be a positive number"),
    ],
)
def test_load_adapter_errors(good_adapter, base_dir, damage, fragment):
    path = damage(good_adapter)
    model = lmforge.load_pretrained(base_dir("qwen2"))
    with pytest.raises(LmforgeError) as e:
        load_adapter(model, path)
    assert fragment in str(e.value)
    assert not lora_modules(model)  # nothing half-applied


def test_load_adapter_for_modules_the_model_lacks(base_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model, config = adapted("qwen2", base_dir("qwen2"), ("q",))
    out = save_adapter(model, config, tmp_path / "a")
    # an adapter for a model of another width
    other = tmp_path / "other"
    make_hf_model("qwen2", other, intermediate_size=96, hidden_size=32, head_dim=8)
    with pytest.raises(LmforgeError, match="is the adapter for this base model"):
        load_adapter(lmforge.load_pretrained(other), out)
    # an adapter for a deeper model, with an lm_head LoRA too
    state = load_file(str(out / "adapter_model.safetensors"))
    deeper = {**state, **{k.replace("layers.1.", "layers.7."): v.clone() for k, v in state.items()}}
    deeper["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64)
    deeper["base_model.model.lm_head.lora_B.weight"] = torch.zeros(300, 4)
    save_file(deeper, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LmforgeError, match="does not have") as e:
        load_adapter(lmforge.load_pretrained(base_dir("qwen2")), out)
    assert "layers.7" in str(e.value) and "lm_head" in str(e.value)
    # a DoRA tensor
    dora = {**state, "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector": torch.ones(64)}
    save_file(dora, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LmforgeError, match="lora_magnitude_vector"):
        load_adapter(lmforge.load_pretrained(base_dir("qwen2")), out)
    # lora_A without its lora_B
    half = {k: v for k, v in state.items() if "layers.0" not in k or "lora_A" in k}
    save_file(half, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(LmforgeError, match="lack lora_A or lora_B"):
        load_adapter(lmforge.load_pretrained(base_dir("qwen2")), out)


def test_apply_and_save_misuse(base_dir, tmp_path):
    model = lmforge.load_pretrained(base_dir("llama"))
    with pytest.raises(LmforgeError, match="no LoRA layers"):
        save_adapter(model, LoraConfig(), tmp_path / "a")
    config = LoraConfig(targets=("q",))
    apply_lora(model, config)
    with pytest.raises(LmforgeError, match="already has LoRA layers"):
        apply_lora(model, config)
    with pytest.raises(LmforgeError, match="already has LoRA layers"):
        load_adapter(model, save_adapter(model, config, tmp_path / "a"))
    with pytest.raises(LmforgeError, match="the LoraConfig says"):
        save_adapter(model, LoraConfig(targets=("q", "v")), tmp_path / "b")
    (tmp_path / "file").write_text("x")
    with pytest.raises(LmforgeError, match="is a file"):
        save_adapter(model, config, tmp_path / "file")


def test_save_adapter_is_atomic(good_adapter, base_dir, monkeypatch):
    (good_adapter / "README.md").write_text("keep me")
    before = {f.name: f.read_bytes() for f in good_adapter.iterdir()}
    model, config = adapted("qwen2", base_dir("qwen2"), ("q", "v"), seed=9)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(lora_mod, "write_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, config, good_adapter)
    assert {f.name: f.read_bytes() for f in good_adapter.iterdir()} == before
    assert [p.name for p in good_adapter.parent.iterdir() if p.name.startswith(".")] == []
    monkeypatch.undo()
    save_adapter(model, config, good_adapter)  # replaces the adapter, keeps the README
    after = {f.name: f.read_bytes() for f in good_adapter.iterdir()}
    assert (
        after["README.md"] == b"keep me" and after["adapter_model.safetensors"] != before["adapter_model.safetensors"]
    )
    assert [p.name for p in good_adapter.parent.iterdir() if p.name.startswith(".")] == []
