"""Checkpoint formats: the one package that knows foreign weight names, in both directions.

hf.py: HuggingFace directories (safetensors, config.json); gguf*.py: llama.cpp's GGUF files.
"""

from lmforge.checkpoint.hf import (
    MAX_SHARD_SIZE,
    companion_files,
    config_from_spec,
    hf_state_dict,
    load_pretrained,
    read_hf_config,
    save_pretrained,
    to_hf_modules,
    to_hf_names,
    write_safetensors,
)

__all__ = [
    "MAX_SHARD_SIZE",
    "companion_files",
    "config_from_spec",
    "hf_state_dict",
    "load_pretrained",
    "read_hf_config",
    "save_pretrained",
    "to_hf_modules",
    "to_hf_names",
    "write_safetensors",
]
