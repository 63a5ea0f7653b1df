"""HuggingFace checkpoint directories <-> lmforge models. The one module that knows HF weight names.

Loading memory-maps the safetensors files: tensors whose dtype already matches stay backed by the
file's pages (copy-on-write), so peak memory is about the size of the weights. Saving streams one
tensor at a time into a temporary directory that replaces the target only when complete.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lmforge.atomic import write_directory
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.model import Transformer

# --- The key map: lmforge name -> HF name, per family ({i} is the layer index). -----------------------
_COMMON = {
    "embed.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
    "layers.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.mlp_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    **{
        f"layers.{{i}}.attn.{p}_proj.{w}": f"model.layers.{{i}}.self_attn.{p}_proj.{w}"
        for p in "qkvo"
        for w in ("weight", "bias")
    },
    **{
        f"layers.{{i}}.mlp.{p}_proj.{w}": f"model.layers.{{i}}.mlp.{p}_proj.{w}"
        for p in ("gate", "up", "down")
        for w in ("weight", "bias")
    },
}
_GLM4_EXTRA = {
    "layers.{i}.attn_out_norm.weight": "model.layers.{i}.post_self_attn_layernorm.weight",
    "layers.{i}.mlp_out_norm.weight": "model.layers.{i}.post_mlp_layernorm.weight",
}
KEY_MAPS: dict[str, dict[str, str]] = {
    "llama": _COMMON,
    "qwen2": _COMMON,
    "glm": _COMMON,
    "glm4": {**_COMMON, **_GLM4_EXTRA},
}
# GLM stores gate and up as one [2I, h] matrix: rows [0, I) gate, [I, 2I) up.
FUSED: dict[str, dict[str, tuple[str, ...]]] = {
    "glm": {
        "model.layers.{i}.mlp.gate_up_proj.weight": ("layers.{i}.mlp.gate_proj.weight", "layers.{i}.mlp.up_proj.weight")
    },
}
FUSED["glm4"] = FUSED["glm"]
# Present in some older checkpoints, recomputed by every loader.
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")

_LAYER = re.compile(r"\.(\d+)\.")


def layer_template(name: str) -> tuple[str, str | None]:
    """`layers.3.attn.q_proj.weight` -> (`layers.{i}.attn.q_proj.weight`, "3"); names outside the layers as
    they are, with None."""
    m = _LAYER.search(name)
    if m is None:
        return name, None
    return name[: m.start()] + ".{i}." + name[m.end() :], m.group(1)


def _leaf(name: str, leaf: str) -> str:
    """A weight's name with another leaf (`...q_proj.weight` -> `...q_proj.qweight`); other names as they are."""
    return f"{name.removesuffix('.weight')}.{leaf}" if leaf != "weight" else name


def to_hf_names(names: list[str], family: str) -> dict[str, tuple[str, ...]]:
    """HF name -> the lmforge names it holds (one, or several for a fused tensor)."""
    key_map = KEY_MAPS[family]
    fused_by_part = {part: hf for hf, parts in FUSED.get(family, {}).items() for part in parts}
    out: dict[str, tuple[str, ...]] = {}
    for name in names:
        tmpl, layer = layer_template(name)
        leaf = "weight"  # a quantized layer's tensors (qweight, scales, zeros): named like its weight, own leaf
        if tmpl not in key_map and tmpl not in fused_by_part:
            module, _, leaf = tmpl.rpartition(".")
            tmpl = f"{module}.weight"
        if tmpl in fused_by_part:
            hf_tmpl = fused_by_part[tmpl]
            parts = FUSED[family][hf_tmpl]
            out[_leaf(hf_tmpl, leaf).format(i=layer)] = tuple(_leaf(p, leaf).format(i=layer) for p in parts)
        else:
            out[_leaf(key_map[tmpl], leaf).format(i=layer)] = (name,)
    return out


def to_hf_modules(modules: list[str], family: str) -> dict[str, tuple[str, ...]]:
    """HF module name -> the lmforge Linear modules whose weights it holds, in row order.

    For adapters (LoRA), which are named after the HF module they wrap: `layers.0.attn.q_proj` ->
    `model.layers.0.self_attn.q_proj`. A fused HF module lists all of its parts (GLM's
    `model.layers.{i}.mlp.gate_up_proj` -> gate_proj, up_proj), even when only one of them was asked for.
    """
    weights = to_hf_names([f"{m}.weight" for m in modules], family)
    return {
        hf.removesuffix(".weight"): tuple(part.removesuffix(".weight") for part in parts)
        for hf, parts in weights.items()
    }


# --- Reading ---------------------------------------------------------------------------------------
def read_hf_config(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise LmforgeError(f"{path} does not exist; pass a checkpoint directory (config.json + *.safetensors).")
    if not path.is_dir():
        raise LmforgeError(f"{path} is a file; pass the checkpoint directory that holds config.json.")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise LmforgeError(f"{path} has no config.json; is it a HuggingFace-format checkpoint directory?")
    try:
        hf = json.loads(cfg.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{cfg} is not valid JSON ({e}); repair or re-download it.") from None
    if not isinstance(hf, dict):
        from lmforge.hf_config import json_type

        raise LmforgeError(
            f'{cfg} must hold a JSON object ({{"model_type": ..., "hidden_size": ..., ...}}), not a JSON '
            f"{json_type(hf)}; repair or re-download it."
        )
    return hf


def config_from_spec(spec: str | os.PathLike) -> ModelConfig:
    """A preset name, an HF checkpoint directory, a GGUF file, or a config file (HF config.json or an
    lmforge dict)."""
    from lmforge.errors import suggest
    from lmforge.presets import PRESETS

    if str(spec) in PRESETS:
        return PRESETS[str(spec)]
    path = Path(spec)
    if path.is_dir():
        return ModelConfig.from_hf(read_hf_config(path))
    if path.is_file():
        from lmforge.checkpoint.gguf_read import is_gguf, read_gguf_config

        if is_gguf(path) or path.suffix.lower() == ".gguf":  # llama.cpp's file: its metadata describes the model
            return read_gguf_config(path)
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise LmforgeError(f"{path} is not valid JSON ({e}); fix the file.") from None
        if not isinstance(d, dict):
            from lmforge.hf_config import json_type

            raise LmforgeError(f"{path} must hold a JSON object with the model's config, not a JSON {json_type(d)}.")
        return ModelConfig.from_hf(d) if "model_type" in d else ModelConfig.from_dict(d)
    raise LmforgeError(
        f"{str(spec)!r} is neither a preset nor an existing path."
        + suggest(str(spec), PRESETS)
        + " `lmforge info --list` shows the presets."
    )


def _weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if single.is_file():  # transformers also prefers it when an index lies beside it
        from safetensors import safe_open

        with _open_safetensors(single, safe_open) as f:
            return dict.fromkeys(f.keys(), single)
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise LmforgeError(f"{index} is not a valid safetensors index ({e}); re-save the checkpoint.") from None
        files = {name: path / fname for name, fname in weight_map.items()}
        for f in sorted(set(files.values())):
            if not f.is_file():
                raise LmforgeError(f"{index} lists {f.name}, which is missing; copy the missing shard into {path}.")
        return files
    if list(path.glob("*.bin")):
        raise LmforgeError(
            f"{path} holds PyTorch .bin weights; lmforge reads safetensors. Convert them once with transformers "
            "(`AutoModelForCausalLM.from_pretrained(d).save_pretrained(d, safe_serialization=True)`)."
        )
    raise LmforgeError(f"{path} has no model.safetensors or model.safetensors.index.json; no weights to load.")


def _open_safetensors(file: Path, safe_open: Any) -> Any:
    try:
        return safe_open(str(file), framework="pt")
    except Exception as e:  # safetensors raises its own error type for corrupt files
        raise LmforgeError(
            f"{file} is not a readable safetensors file ({e}); it is truncated or corrupt: re-download or re-save it."
        ) from None


def load_pretrained(
    path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu"
) -> Transformer:
    """Load an HF-format directory (config.json + model.safetensors or a sharded index).

    dtype None keeps the stored dtype; "auto" keeps it too unless it is a half precision that is slow on
    this machine (then fp32, see lmforge.runtime); tensors that need no conversion stay memory-mapped.
    A `.gguf` file is read by lmforge/checkpoint/gguf_read.py (dequantized to fp32 unless dtype says otherwise).
    """
    if Path(path).suffix.lower() == ".gguf":
        from lmforge.checkpoint.gguf_read import load_gguf

        return load_gguf(path, dtype=dtype, device=device)
    from safetensors import safe_open

    from lmforge.config import dtype_from_name
    from lmforge.runtime import inference_dtype

    wanted = dtype

    path = Path(path)
    hf_config = read_hf_config(path)
    config = ModelConfig.from_hf(hf_config)
    files = _weight_files(path)
    _check_layer_count(path, config, files)
    if config.tie_embeddings and "lm_head.weight" in files and not _same_tensor(files, "lm_head.weight", safe_open):
        # transformers uses a stored head that differs from the embedding instead of tying; so do we.
        config = config.replace(tie_embeddings=False)
    with torch.device("meta"):
        model = Transformer(config, device="meta")
    quantized: set[str] = set()  # names of quantized tensors: loaded as stored, never cast
    if hf_config.get("quantization_config"):  # hf_config.py refused any other than lmforge's
        from lmforge.quant.quantize import quantize_as, quantized_layers

        quantize_as(model, hf_config["quantization_config"], f"{path}/config.json")  # empty layers on meta
        quantized = {f"{n}.{b}" for n, layer in quantized_layers(model).items() for b, _ in layer.named_buffers()}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    hf_to_ours = to_hf_names(list(expected), config.family)

    missing = [hf for hf in hf_to_ours if hf not in files]
    unexpected = [
        hf
        for hf in files
        if hf not in hf_to_ours and not _IGNORED.match(hf) and not (hf == "lm_head.weight" and config.tie_embeddings)
    ]
    if missing or unexpected:
        raise LmforgeError(_mismatch_message(path, missing, unexpected))

    handles: dict[Path, Any] = {}
    state: dict[str, torch.Tensor] = {}
    wrong_shape: list[str] = []
    for hf, ours in hf_to_ours.items():
        file = files[hf]
        if file not in handles:
            handles[file] = _open_safetensors(file, safe_open)
        try:
            tensor = handles[file].get_tensor(hf)
        except Exception as e:
            raise LmforgeError(f"cannot read tensor {hf} from {file} ({e}); the file is corrupt: re-save it.") from None
        if ours[0] in quantized:  # stored as written: int8 / packed int4 and their fp32 scales
            # Copied out of the memory map: the int8 kernel's vector loads fault on a file offset's alignment.
            parts = tuple(p.clone() for p in (tensor.chunk(len(ours), dim=0) if len(ours) > 1 else (tensor,)))
            if any(tuple(p.shape) != expected[n] for n, p in zip(ours, parts, strict=True)):
                wrong_shape.append(f"{hf} has shape {list(tensor.shape)}")
            state.update(zip(ours, parts, strict=True))
            continue
        if not tensor.dtype.is_floating_point:
            # Integer weights are quantized or not weights at all; casting them to float would load garbage.
            raise LmforgeError(
                f"{file}: tensor {hf} has dtype {str(tensor.dtype).removeprefix('torch.')}, but model weights are "
                "floating point (float32, bfloat16, float16); this checkpoint is quantized or corrupt: "
                "re-save it in a float dtype."
            )
        if not isinstance(dtype, torch.dtype):  # the first tensor tells the stored dtype
            if wanted == "auto":
                dtype = inference_dtype("auto", tensor.dtype, device)
            else:
                dtype = tensor.dtype if wanted is None else dtype_from_name(str(wanted))
        parts = tensor.chunk(len(ours), dim=0) if len(ours) > 1 else (tensor,)
        for name, part in zip(ours, parts, strict=True):
            if tuple(part.shape) != expected[name]:
                wrong_shape.append(
                    f"{hf} has shape {list(tensor.shape)}, config.json implies "
                    f"{[expected[name][0] * len(ours), *expected[name][1:]]}"
                )
                break
            state[name] = part if part.dtype == dtype else part.to(dtype)
    handles.clear()
    if wrong_shape:
        raise LmforgeError(
            f"{path}: {len(wrong_shape)} tensor(s) do not match config.json: {'; '.join(wrong_shape[:5])}"
            + ("; ..." if len(wrong_shape) > 5 else "")
            + ". Is config.json the one for these weights?"
        )
    model.load_state_dict(state, strict=True, assign=True)
    model.eval()
    return model.to(device) if str(device) != "cpu" else model


def _check_layer_count(path: Path, config: ModelConfig, files: dict[str, Path]) -> None:
    """Before building the model: the layers config.json declares are the layers the weights hold."""
    layers = {int(m.group(1)) for name in files if (m := re.match(r"model\.layers\.(\d+)\.", name))}
    if len(layers) != config.num_layers:
        held = f"{len(layers)} (model.layers.{min(layers)} .. {max(layers)})" if layers else "none"
        raise LmforgeError(
            f"{path}: config.json says num_hidden_layers={config.num_layers}, but the weights hold layers: {held}. "
            "Is config.json the one for these weights?"
        )


def _same_tensor(files: dict[str, Path], name: str, safe_open: Any) -> bool:
    """Whether tensor `name` equals the token embedding (a tied head saved redundantly)."""
    embed = "model.embed_tokens.weight"
    if embed not in files:
        return True  # reported as missing later
    with _open_safetensors(files[name], safe_open) as a, _open_safetensors(files[embed], safe_open) as b:
        x, y = a.get_tensor(name), b.get_tensor(embed)
        return x.shape == y.shape and bool(torch.equal(x, y))


def _mismatch_message(path: Path, missing: list[str], unexpected: list[str]) -> str:
    def some(names: list[str]) -> str:
        return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")

    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing ({some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s) ({some(unexpected)})")
    return (
        f"{path}: the weights do not match config.json: "
        + "; ".join(parts)
        + ". Check that config.json belongs to these weights and that no shard is missing."
    )


# --- Writing ---------------------------------------------------------------------------------------
_ST_DTYPES = {
    torch.float32: "F32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", size.upper())
    if not m:
        raise LmforgeError(f"cannot read size {size!r}; write it like 5GB, 500MB or a number of bytes.")
    return int(float(m.group(1)) * 1000 ** " KMGT".index(m.group(2) or " "))


def write_safetensors(file: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write the safetensors format one tensor at a time (no second copy of the state in memory)."""
    header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            f.write(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())


def hf_state_dict(model: Transformer, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs in checkpoint order, fused where the family fuses; one at a time."""
    state = model.state_dict()
    for hf, ours in to_hf_names(list(state), model.config.family).items():
        t = state[ours[0]] if len(ours) == 1 else torch.cat([state[n] for n in ours], dim=0)
        yield hf, t if dtype is None or not t.is_floating_point() else t.to(dtype)


def companion_files(directory: Path) -> dict[str, str]:
    """File name -> text of what travels with a checkpoint's weights when it is written anew (converted,
    merged, pruned, quantized): the tokenizer's files and generation_config.json (sampling defaults)."""
    from lmforge.tokenizer import tokenizer_files

    files = [*tokenizer_files(directory), Path(directory) / "generation_config.json"]
    return {f.name: f.read_text() for f in files if f.is_file()}


MAX_SHARD_SIZE = "5GB"  # transformers' default shard size

# What a checkpoint directory owns; anything else found there (a tokenizer, a README) is kept on re-save.
_OWNED = re.compile(r"(model.*\.safetensors|model\.safetensors\.index\.json|config\.json|generation_config\.json)$")


def save_pretrained(
    model: Transformer,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Write an HF-format directory that transformers' AutoModelForCausalLM loads.

    Files are written to a temporary sibling directory that replaces `path` only once complete, so a
    crash never leaves a half-written checkpoint in place of a good one. Files already in `path` that are
    not weights or configs (a tokenizer, a README) are kept.
    """
    limit = _parse_size(max_shard_size)
    config = model.config.replace(dtype=str(dtype or model.embed.weight.dtype).removeprefix("torch."))
    hf_config = config.to_hf()
    quantization = getattr(model, "quantization_config", None)  # set by lmforge.quantize
    if quantization is not None:
        if dtype is not None:
            raise LmforgeError("a quantized model is saved as it is quantized: drop the dtype (--dtype).")
        hf_config["quantization_config"] = quantization

    def write(tmp: Path) -> None:
        _write_shards(model, tmp, dtype, limit)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        gen = {
            "bos_token_id": config.bos_token_id,
            "eos_token_id": list(config.eos_token_id) or None,
            "pad_token_id": config.pad_token_id,
        }
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    return write_directory(path, write, owned=lambda name: bool(_OWNED.fullmatch(name)))


def _write_shards(model: Transformer, out: Path, dtype: torch.dtype | None, limit: int) -> None:
    # Plan shards from sizes alone, then write each shard streaming its tensors.
    names, sizes = [], []
    itemsize = torch.empty(0, dtype=dtype).element_size() if dtype is not None else None
    state = model.state_dict()
    for hf, ours in to_hf_names(list(state), model.config.family).items():
        numel = sum(state[n].numel() for n in ours)
        names.append(hf)
        sizes.append(numel * (itemsize or state[ours[0]].element_size()))
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in zip(names, sizes, strict=True):
        if shards[-1] and used + size > limit:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    tensors = hf_state_dict(model, dtype)
    if len(shards) == 1:
        write_safetensors(out / "model.safetensors", dict(tensors))
        return
    weight_map = {}
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / fname, dict(next(tensors) for _ in shard))
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
