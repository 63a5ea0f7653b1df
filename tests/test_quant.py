"""Weight-only int8 / int4 quantization: the layers against an independent fp64 reference, the pass, the
checkpoint format, the decode thread split, the engine (with an int8 KV cache), QLoRA and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

import lmforge
from lmforge.errors import LmforgeError
from lmforge.finetune.lora import LoraConfig, QLoraLinear, apply_lora, merge_lora
from lmforge.generate import gemv
from lmforge.generate.engine import Engine, EngineConfig
from lmforge.generate.options import GenerationOptions
from lmforge.generate.paged import PagedKVCache
from lmforge.quant import int8_product
from lmforge.quant import layers as quant_layers
from lmforge.quant.layers import Int4Linear, Int8Linear
from lmforge.quant.quantize import dequantize, quantize, quantized_layers
from lmforge.train.objectives import causal_lm

PRESETS = ("tiny-llama", "tiny-qwen2", "tiny-glm4")


def model_of(preset: str = "tiny-llama", seed: int = 0, **changes) -> lmforge.Transformer:
    config = lmforge.ModelConfig.from_preset(preset)
    if changes:
        config = config.replace(**changes)
    torch.manual_seed(seed)
    return lmforge.Transformer(config).eval()


def biased(model: lmforge.Transformer, seed: int = 0) -> lmforge.Transformer:
    """Random biases where the model has them (they start at zero)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.5, generator=generator)
    return model


def linear(n: int, k: int, seed: int = 0, bias: bool = True) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.2, 3.0, k))  # columns of different scale: groups matter
    return layer


# --- the layers -----------------------------------------------------------------------------------------
def test_int8_is_the_nearest_step_of_a_per_channel_absmax_grid():
    base = linear(96, 64)
    layer = Int8Linear.from_linear(base, torch.float32)
    w = base.weight.detach().double()
    step = w.abs().amax(dim=1, keepdim=True) / 127  # [N, 1]
    assert layer.qweight.dtype == torch.int8 and layer.qweight.abs().max() == 127
    assert torch.equal(layer.qweight.long(), torch.round(w / step).long())
    err = (layer.dequantize().double() - w).abs()
    assert bool((err <= step / 2 + 1e-7).all())


def test_int4_groups_round_trip_through_the_nibbles():
    base = linear(64, 128)
    layer = Int4Linear.from_linear(base, torch.float32, group_size=32)
    assert layer.qweight.shape == (64, 64) and layer.qweight.dtype == torch.uint8
    w = base.weight.detach().double().reshape(64, 4, 32)  # [N, G, g]
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    step = (hi - lo) / 15
    q = torch.round((w - lo) / step).clamp(0, 15)
    assert torch.equal(layer.unpacked().double(), q.reshape(64, 128))  # low nibble = even input
    err = (layer.dequantize().double().reshape(64, 4, 32) - w).abs()
    assert bool((err <= step / 2 + 1e-6).all())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16])
def test_kernels_compute_the_product_with_the_dequantized_weight(bits, act):
    base = linear(128, 256, seed=1)
    layer = Int8Linear.from_linear(base, act) if bits == 8 else Int4Linear.from_linear(base, act, 64)
    x = torch.randn(5, 3, 256)
    # the reference: the layer's own integers and scales, dequantized and multiplied in fp64
    ref = x.to(act).double() @ layer.dequantize().double().t() + base.bias.double()
    with torch.no_grad():
        out = layer(x)
    assert out.shape == (5, 3, 128) and out.dtype == torch.float32
    tol = 1e-4 if act == torch.float32 else 3e-2  # bf16 rounds the products' inputs and outputs
    assert (out.double() - ref).abs().max() < tol * ref.abs().max()


def w8a8_reference(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    """Each row alone: its min..max (zero included) in 127 steps, the products exact, then the scales."""
    lo, hi = x.amin(1, keepdim=True).clamp(max=0), x.amax(1, keepdim=True).clamp(min=0)
    step = (hi - lo) / 127
    zero = torch.round(-lo / step).clamp(0, 127)
    xq = (torch.round(x / step) + zero).clamp(0, 127)
    w = layer.qweight.double() * layer.scales.double()[:, None]
    return ((xq - zero) * step).double() @ w.t() + layer.bias.double()


FBGEMM_ROWS = 4  # what the tests set the measured limit to (int8_product.fbgemm_row_limit)


@pytest.mark.parametrize("rows", [FBGEMM_ROWS, 2 * FBGEMM_ROWS])  # decode rows through FBGEMM; prefill rows
def test_w8a8_quantizes_each_input_row_and_multiplies_in_integers(rows, monkeypatch):
    monkeypatch.setattr(quant_layers, "fbgemm_row_limit", lambda: FBGEMM_ROWS)
    base = linear(128, 256, seed=3)
    layer = Int8Linear.from_linear(base, torch.int8)
    if rows <= FBGEMM_ROWS and layer.w8a8("packed") is None:
        pytest.skip("this torch has no FBGEMM dynamic-quantized linear")
    scales = torch.tensor([[0.1], [1.0], [10.0], [100.0]]).repeat(rows // 4, 1)  # rows of very different scale
    x = torch.randn(rows, 256) * scales
    x[:, 7] += 3 * x.abs().amax(1)  # a skewed range: asymmetric quantization uses it better
    with torch.no_grad():
        out = layer(x).double()
        alone = torch.cat([layer(row) for row in x.split(1)]).double()
    err = (out - w8a8_reference(layer, x)).abs().amax(1) / out.abs().amax(1)
    assert float(err.max()) < 2e-3  # the reference's numbers (a rounding tie may land one step off)
    if rows <= FBGEMM_ROWS:
        assert torch.equal(out, alone)  # a row's result never depends on the other rows
    exact = x.double() @ base.weight.double().t() + base.bias.double()
    rel = (out - exact).abs().amax(1) / exact.abs().amax(1)
    # Every row within its own 7-bit error, the 0.1-scale one too (one range for all four would leave it ~100%).
    assert float(rel.max()) < 0.1
    with pytest.raises(LmforgeError, match="goes with method int8"):
        quantize(model_of(), "int4", act_dtype="int8")


def test_the_exact_int8_products_agree_with_int64_arithmetic_at_the_range_limit():
    k = 2 * int8_product.EXACT_CHUNK + 37  # two full chunks and a remainder
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (9, k), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (int8_product.WEIGHT_ROWS + 24, k), dtype=torch.int8, generator=g)  # 2 blocks
    a[0], w[0], w[1] = -128, -128, 127  # every product at +-2^14: the chunks' partial sums reach +-2^24
    a[1] = -128
    a[1, int8_product.EXACT_CHUNK - 1] = a[1, -1] = 1  # odd terms among large sums: fp32 keeps them only < 2^24
    reference = a.long() @ w.long().t()
    assert int(reference[0, 0]) == k * 2**14
    for product in (int8_product.float_product, lambda a, w: torch._int_mm(a, w.t()), int8_product.int8_product):
        out = product(a, w)
        assert out.dtype == torch.int32 and torch.equal(out.long(), reference)


def test_w8a8_routes_rows_by_the_measured_limit(monkeypatch):
    layer = Int8Linear.from_linear(linear(64, 256, seed=4), torch.int8)
    if layer.w8a8("packed") is None:
        pytest.skip("this torch has no FBGEMM dynamic-quantized linear")
    assert int8_product.fbgemm_row_limit() in int8_product.ROW_LIMITS  # timed on this machine
    calls = []
    for name in ("fbgemm_rows", "int8_product"):
        real = getattr(quant_layers, name)
        monkeypatch.setattr(quant_layers, name, lambda *a, real=real, name=name: calls.append(name) or real(*a))
    monkeypatch.setattr(quant_layers, "fbgemm_row_limit", lambda: 8)
    with torch.no_grad():
        for rows in (1, 8, 9):
            layer(torch.randn(rows, 256))
    assert calls == ["fbgemm_rows", "fbgemm_rows", "int8_product"]
    # The limit: the last row count before the row loop (its time first) is slower than one exact product.
    assert int8_product.row_limit({2: (1.0, 3.0), 4: (2.0, 3.0), 8: (4.0, 3.0), 16: (3.0, 3.5)}) == 4
    assert int8_product.row_limit({2: (3.0, 1.0), 4: (6.0, 1.0)}) == 1


def test_w8a8_prefill_rows_are_the_same_whichever_exact_product_runs(monkeypatch):
    monkeypatch.setattr(quant_layers, "fbgemm_row_limit", lambda: FBGEMM_ROWS)
    layer = Int8Linear.from_linear(linear(64, 1100, seed=5), torch.int8)
    x = torch.randn(3 * FBGEMM_ROWS, 1100)
    outs = []
    for float_wins in (True, False):
        monkeypatch.setattr(int8_product, "_float_is_faster", lambda w=float_wins: w)
        with torch.no_grad():
            outs.append(layer(x))
    assert torch.equal(outs[0], outs[1])
    # A lowered fp32 matmul precision rounds the GEMM's inputs: then only _int_mm runs.
    monkeypatch.setattr(int8_product, "_float_is_faster", lambda: True)
    monkeypatch.setattr(int8_product, "float_product", lambda a, w: pytest.fail("fp32 product at lowered precision"))
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        with torch.no_grad():
            assert torch.equal(layer(x), outs[0])
    finally:
        torch.set_float32_matmul_precision(saved)


def test_gradients_reach_the_input_through_a_quantized_layer():
    base = linear(64, 96, seed=2)
    for layer in (Int8Linear.from_linear(base, torch.float32), Int4Linear.from_linear(base, torch.float32, 32)):
        x = torch.randn(4, 96, requires_grad=True)
        layer(x).pow(2).sum().backward()
        x_ref = x.detach().clone().requires_grad_(True)
        F.linear(x_ref, layer.dequantize(), layer.bias).pow(2).sum().backward()
        assert torch.allclose(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
        assert not any(p.requires_grad for p in layer.parameters())  # the quantized base stays frozen


# --- the pass --------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("method,budget", [("int8", 0.03), ("int4", 0.3)])
def test_quantize_replaces_every_projection_and_the_head(preset, method, budget):
    model, ref = model_of(preset), model_of(preset)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    report = quantize(model, method, 32)
    layers = quantized_layers(model)
    per_block = 7  # q, k, v, o, gate, up, down
    assert report.layers == len(layers) == per_block * model.config.num_layers + 1 and "lm_head" in layers
    assert not [m for m in model.modules() if type(m) is nn.Linear]
    assert report.bytes_after < report.bytes_before / (3.5 if method == "int8" else 5)
    with torch.no_grad():
        got, want = model(ids), ref(ids)
    assert (got - want).abs().max() < budget * want.abs().max()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > (0.9 if method == "int8" else 0.5)
    with pytest.raises(LmforgeError, match="already quantized"):
        quantize(model, method)


def test_int4_keeps_layers_its_kernel_cannot_take_in_float():
    model = model_of("tiny-llama", intermediate_size=72)  # gate/up: 72 rows, not a multiple of 16; down: 72 inputs
    report = quantize(model, "int4", 32)
    kept = {f"layers.{i}.mlp.{p}_proj" for i in range(model.config.num_layers) for p in ("gate", "up", "down")}
    assert set(report.skipped) == kept and all(type(model.get_submodule(n)) is nn.Linear for n in kept)
    assert "kept in float" in str(report)


def storage_bytes(model: nn.Module) -> int:
    storages = {b.untyped_storage().data_ptr(): b.untyped_storage().nbytes() for b in model.buffers()}
    return sum(storages.values())


@pytest.mark.parametrize("method,act", [("int8", "bfloat16"), ("int4", "float32"), ("int8", "int8")])
def test_siblings_share_one_product_of_their_stacked_weights(tmp_path, method, act):
    model = biased(model_of("tiny-qwen2"))  # q/k/v with biases: the group adds them once, to the shared product
    quantize(model, method, 32, act_dtype=act)
    alone = biased(model_of("tiny-qwen2"))
    quantize(alone, method, 32, act_dtype=act)
    for layer in quantized_layers(alone).values():
        layer.shared = None
    attn, mlp = model.layers[0].attn, model.layers[0].mlp
    assert attn.q_proj.shared is attn.k_proj.shared is attn.v_proj.shared is not None
    assert mlp.gate_proj.shared is mlp.up_proj.shared is not mlp.down_proj.shared
    before = storage_bytes(model)
    calls = []
    kind = type(attn.q_proj)
    kernel = kind.kernel
    ids = torch.randint(0, model.config.vocab_size, (2, 5))
    with torch.inference_mode(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(kind, "kernel", lambda layer, xa: calls.append(layer.out_features) or kernel(layer, xa))
        shared = model(ids)
        assert torch.equal(shared, alone(ids))  # the same dot products: bit-identical
    c = model.config
    qkv = (c.num_heads + 2 * c.num_kv_heads) * c.head_dim
    assert calls[:4] == [qkv, c.hidden_size, 2 * c.intermediate_size, c.hidden_size]  # one block: 4 products
    assert len(calls) == (4 * c.num_layers + 1) + (7 * c.num_layers + 1)  # shared, then alone; with the heads
    # the layers' tensors became rows of the stacked ones: no second copy of any weight
    for name in ("qweight", "bias"):
        first, other = getattr(attn.q_proj, name), getattr(attn.k_proj, name)
        assert other.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
    assert storage_bytes(model) == before
    # weights loaded in place (load_state_dict without assign) reach the stacked tensors through the views
    other = biased(model_of("tiny-qwen2", seed=1), seed=1)
    quantize(other, method, 32, act_dtype=act)
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        assert torch.equal(model(ids), other(ids))
        model.load_state_dict(alone.state_dict())
        assert torch.equal(model(ids), shared)
    # a sibling called alone, on an input of its own, still gets its own product
    x = torch.randn(3, c.hidden_size)
    with torch.inference_mode():
        assert torch.equal(attn.v_proj(x), alone.layers[0].attn.v_proj(x))
    lmforge.save_pretrained(model, tmp_path)  # the row views save as one tensor per layer
    back = lmforge.load_pretrained(tmp_path)
    for layer in quantized_layers(back).values():  # a file keeps W8A8 only: the float act dtype is measured
        layer.act_dtype = getattr(torch, act)
    with torch.inference_mode():
        assert torch.equal(back(ids), shared)


def test_dequantize_gives_back_a_float_model_that_computes_the_same():
    model = model_of("tiny-qwen2")
    quantize(model, "int8", act_dtype="float32", head=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 9))
    with torch.no_grad():
        before = model(ids)
        dequantize(model)
        after = model(ids)
    assert not quantized_layers(model) and not hasattr(model, "quantization_config")
    assert torch.allclose(before, after, atol=1e-4)
    quantize(model, "int8")  # a tied model's quantized head is a copy: dequantizing drops it again
    assert model.lm_head is not None and dequantize(model).lm_head is None


# --- the checkpoint format -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "preset,method,act", [("tiny-llama", "int4", "auto"), ("tiny-glm4", "int8", "auto"), ("tiny-qwen2", "int8", "int8")]
)
def test_a_quantized_checkpoint_loads_back_quantized(tmp_path, preset, method, act):
    model = model_of(preset)
    quantize(model, method, 32, act_dtype=act)
    lmforge.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "lmforge"
    assert config["quantization_config"]["bits"] == (8 if method == "int8" else 4)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        names = set(f.keys())
        qname = next(n for n in names if n.endswith("down_proj.qweight"))
        assert f.get_tensor(qname).dtype == (torch.int8 if method == "int8" else torch.uint8)
    assert not any(n.endswith("proj.weight") for n in names)  # no float copy of a quantized weight
    if preset == "tiny-glm4":  # the fused HF tensor of GLM, quantized rows concatenated
        assert "model.layers.0.mlp.gate_up_proj.qweight" in names
    back = lmforge.load_pretrained(tmp_path)
    assert {n: type(m) for n, m in quantized_layers(back).items()} == {
        n: type(m) for n, m in quantized_layers(model).items()
    }
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    with pytest.raises(LmforgeError, match="drop the dtype"):
        lmforge.save_pretrained(model, tmp_path / "bf16", dtype=torch.bfloat16)


def test_a_foreign_quantization_is_refused_in_one_line():
    hf = lmforge.ModelConfig.from_preset("tiny-llama").to_hf()
    with pytest.raises(LmforgeError, match="'gptq' is not supported") as e:
        lmforge.ModelConfig.from_hf({**hf, "quantization_config": {"quant_method": "gptq", "bits": 4}})
    assert "\n" not in str(e.value)


# --- decoding: the decode threads, the engine, the int8 KV cache ---------------------------------------
@pytest.mark.parametrize("method,act", [("int8", "auto"), ("int4", "auto"), ("int8", "int8")])
def test_decode_steps_lend_the_kernels_every_thread(monkeypatch, method, act):
    monkeypatch.setattr(gemv, "MIN_WEIGHT", 1)  # even the tiny layers
    model = model_of("tiny-llama")
    quantize(model, method, 32, act_dtype=act)
    ids = torch.randint(0, model.config.vocab_size, (3, 1))
    seen = []
    kind = type(model.lm_head)
    kernel = kind.kernel
    monkeypatch.setattr(kind, "kernel", lambda layer, xa: seen.append(torch.get_num_threads()) or kernel(layer, xa))
    torch.set_num_threads(2)
    with torch.inference_mode():
        whole = model(ids)
        with gemv.ParallelGemv(model, threads=2) as ctx:
            assert sum(name == "gemv" for _, name in ctx.patched) == len(quantized_layers(model))
            assert torch.get_num_threads() == 1  # the small ops of a decode step run on one thread...
            parts = model(ids)
        assert torch.get_num_threads() == 2  # ...until the context ends
    products = 4 * model.config.num_layers + 1  # q/k/v as one, o, gate/up as one, down; the head
    assert seen == [2] * (2 * products)  # ...and every product on both
    assert torch.equal(whole, parts)
    assert all(m.gemv is None for m in quantized_layers(model).values())  # removed again


def naive_greedy(model: lmforge.Transformer, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.mark.parametrize("method,act", [("int8", "float32"), ("int4", "float32"), ("int8", "int8")])
def test_the_engine_decodes_a_quantized_model(method, act):
    model = model_of("tiny-llama", initializer_range=0.3)  # peaked logits: greedy has no near-ties
    quantize(model, method, 32, act_dtype=act)
    prompts = [[5, 9, 17, 33], [250, 3], [7] * 9]
    engine = Engine(model, config=EngineConfig(max_batch=3))
    try:
        handles = [engine.submit(p, GenerationOptions(max_new_tokens=8, do_sample=False)) for p in prompts]
        engine.run_until_done()  # the three together: batched decode steps
        outs = [[e.token_id for e in h if e.token_id is not None] for h in handles]
    finally:
        engine.close()
    for prompt, out in zip(prompts, outs, strict=True):
        assert out == naive_greedy(model, prompt, 8)


def test_an_int8_kv_cache_scores_prompts_close_to_the_model():
    model = model_of("tiny-llama")
    prompt = torch.randint(0, model.config.vocab_size, (40,)).tolist()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt]))[0].double(), -1)
    want = [float(logp[i, prompt[i + 1]]) for i in range(len(prompt) - 1)]
    got = {}
    for kv in ("model", "int8"):
        engine = Engine(model, config=EngineConfig(kv_cache_dtype=kv, prefill_chunk=16))
        try:
            h = engine.submit(prompt, GenerationOptions(max_new_tokens=1), prompt_logprobs=0)
            engine.run_until_done()
            list(h)
        finally:
            engine.close()
        got[kv] = torch.tensor(h.prompt_logprobs[1:], dtype=torch.float64)
    exact, int8 = (got["model"] - torch.tensor(want)).abs().max(), (got["int8"] - torch.tensor(want)).abs().max()
    assert exact < 1e-4 and 1e-5 < int8 < 0.01  # 8-bit keys and values: close, and not the fp32 cache


def test_the_int8_kv_cache_is_a_quarter_of_fp32_and_close_to_it():
    config = lmforge.ModelConfig.from_preset("tiny-llama")
    fp32 = PagedKVCache.bytes_per_block(config, 16, torch.float32)
    int8 = PagedKVCache.bytes_per_block(config, 16, torch.float32, int8=True)
    assert int8 == fp32 // 4 * (config.head_dim + 4) // config.head_dim
    cache = PagedKVCache(config, 4, 16, torch.float32, "cpu", int8=True)
    k = torch.randn(1, config.num_kv_heads, 5, config.head_dim)
    slots = torch.arange(5).view(1, 5)
    keys, values = cache.view(slots, slots).update(0, k, -k)
    step = k.abs().amax(-1, keepdim=True) / 127
    assert cache.k[0].dtype == torch.int8 and bool(((keys - k).abs() <= step / 2 + 1e-6).all())
    assert torch.allclose(values, -keys)


# --- QLoRA -----------------------------------------------------------------------------------------
def test_qlora_trains_adapters_over_a_frozen_quantized_base():
    model = model_of("tiny-llama")
    quantize(model, "int4", 32, act_dtype="float32", head=False)  # fp32 products: the merge must match closely
    frozen = {n: b.clone() for n, b in model.named_buffers() if n.endswith("qweight")}
    report = apply_lora(model, LoraConfig(r=4, alpha=8, targets=("q", "v", "down")))
    assert report.modules == 3 * model.config.num_layers
    assert isinstance(model.layers[0].attn.q_proj, QLoraLinear)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, model.config.vocab_size, (4, 17))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    model.train()
    losses = []
    for _ in range(6):
        out = causal_lm(model, batch)
        loss = out.loss_sum / out.weight
        opt.zero_grad()
        loss.backward()
        assert model.layers[0].attn.q_proj.lora_B.grad.abs().sum() > 0  # through every quantized layer above
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05
    after = {n: b for n, b in model.named_buffers() if n.endswith("qweight")}
    assert {n.replace(".base_layer", "") for n in after} == set(frozen)
    assert all(torch.equal(b, frozen[n.replace(".base_layer", "")]) for n, b in after.items())
    model.eval()
    with torch.no_grad():
        adapted = model(ids)
        merge_lora(model)  # a QLoRA model merges into a float one
        merged = model(ids)
    assert not quantized_layers(model) and not hasattr(model, "quantization_config")
    assert (adapted - merged).abs().max() < 1e-4 * adapted.abs().max()


# --- the command -----------------------------------------------------------------------------------
def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=300)


def test_cli_quantizes_a_checkpoint_and_scores_it(tmp_path):
    model = model_of("tiny-llama")
    lmforge.save_pretrained(model, tmp_path / "fp32")
    text = tmp_path / "held-out.txt"
    text.write_text("".join(f"line {i} of some held-out text.\n" for i in range(50)))
    tok = lmforge.Tokenizer.train([text.read_text()], 300, "llama3", min_frequency=1)
    tok.save(tmp_path / "fp32")
    done = run("quantize", "--model", str(tmp_path / "fp32"), "--out", str(tmp_path / "q"), "--method", "int4",
               "--eval-data", str(text))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "int4: 15 layers" in done.stdout and "held-out perplexity" in done.stdout
    assert (tmp_path / "q" / "tokenizer.json").is_file()
    back = lmforge.load_pretrained(tmp_path / "q")
    assert len(quantized_layers(back)) == 15
    for bad, says in (
        (["--model", str(tmp_path / "fp32"), "--out", str(tmp_path / "fp32")], "is the source checkpoint"),
        (["--model", str(tmp_path / "none"), "--out", str(tmp_path / "x")], "not a checkpoint directory"),
        (["--model", str(tmp_path / "q"), "--out", str(tmp_path / "x")], "already quantized"),
    ):
        failed = run("quantize", *bad)
        assert failed.returncode == 2 and says in failed.stderr and "Traceback" not in failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1
