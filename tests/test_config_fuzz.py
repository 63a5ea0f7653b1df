"""Property test: whatever is wrong in a config.json, lmforge loads it or says what is wrong (LmforgeError).

Real tiny checkpoints written by transformers (llama, qwen2, glm, glm4, and llama3 / yarn rope scaling) have
their config.json mutated: keys deleted, set to null, to values of the wrong type (strings, floats, bools,
lists, nested objects), to negative, zero, huge or non-finite numbers, or nudged (v+1, 2v, -v). Loading must
either succeed, and then the model runs a forward pass and a short generation and its config survives a
config.json round trip, or raise LmforgeError; any other exception is a bug.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_hf_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lmforge
from lmforge import LmforgeError, ModelConfig

SEEDS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "glm": ("glm", {"head_dim": 16}),
    "glm4": ("glm4", {"head_dim": 16}),
    "llama-rope-llama3": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            }
        },
    ),
    "qwen2-rope-yarn": (
        "qwen2",
        {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 32.0}},
    ),
}
# Keys a config.json may have or lack; each is a candidate for mutation besides those present.
EXTRA_KEYS = [
    "head_dim",
    "num_key_value_heads",
    "rope_theta",
    "rope_scaling",
    "partial_rotary_factor",
    "original_max_position_embeddings",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "use_sliding_window",
    "initializer_range",
    "dtype",
    "torch_dtype",
    "quantization_config",
]
ROPE_KEYS = [
    "rope_type",
    "type",
    "rope_theta",
    "factor",
    "partial_rotary_factor",
    "original_max_position_embeddings",
    "low_freq_factor",
    "high_freq_factor",
    "beta_fast",
    "beta_slow",
    "mscale",
    "mscale_all_dim",
    "attention_factor",
    "truncate",
    "short_factor",
    "long_factor",
]
NASTY = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.integers(-(2**70), 2**70),
    st.sampled_from([16, 64, 128, 300, 2**31, 10**12, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -1.0, 0.5, 1.0, 64.0, 100.5, 1e-6, 1e300, math.nan, math.inf, -math.inf]),
    st.text(max_size=6),
    st.sampled_from(["", "1e-5", "128", "true", "silu", "gelu", "linear", "llama3", "yarn", "longrope", "default"]),
    st.lists(st.integers(-2, 400), max_size=4),
    st.lists(st.one_of(st.integers(), st.floats(), st.text(max_size=3), st.none()), max_size=3),
    st.dictionaries(
        st.sampled_from(["rope_type", "factor", "rope_theta", "type", "short_factor", "x"]),
        st.one_of(st.none(), st.integers(-2, 10), st.floats(), st.text(max_size=5), st.lists(st.floats(), max_size=2)),
        max_size=3,
    ),
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The models are tiny: on a loaded 2-core machine a second thread only adds waiting (0.5 s per forward).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict[str, Any]]]:
    """name -> (a directory holding transformers' model.safetensors, the config.json transformers wrote)."""
    out = {}
    for name, (model_type, kwargs) in SEEDS.items():
        path = tmp_path_factory.mktemp(name)
        make_hf_model(model_type, path, **kwargs)
        out[name] = (path, json.loads((path / "config.json").read_text()))
    return out


def _nudge(value: Any, how: int) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    return [value + 1, value - 1, value * 2, -value][how]


def _mutate(data: st.DataObject, config: dict[str, Any]) -> dict[str, Any]:
    config = json.loads(json.dumps(config))  # a deep copy
    for _ in range(data.draw(st.integers(1, 3))):
        rope = config.get("rope_parameters")
        paths = [(k,) for k in sorted(set(config) | set(EXTRA_KEYS))]
        if isinstance(rope, dict):
            paths += [("rope_parameters", k) for k in sorted(set(rope) | set(ROPE_KEYS))]
        path = data.draw(st.sampled_from(paths))
        parent = config if len(path) == 1 else config["rope_parameters"]
        key = path[-1]
        op = data.draw(st.sampled_from(["delete", "set", "set", "nudge"]))
        if op == "delete":
            parent.pop(key, None)
        elif op == "nudge" and key in parent:
            parent[key] = _nudge(parent[key], data.draw(st.integers(0, 3)))
        else:
            parent[key] = data.draw(NASTY)
    return config


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_config_json_loads_or_raises_lmforge_error(checkpoints, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(checkpoints)))
    path, original = checkpoints[name]
    config = _mutate(data, original)
    (path / "config.json").write_text(json.dumps(config))
    try:
        model = lmforge.load_pretrained(path)
    except LmforgeError as e:
        assert str(e) and "\n" not in str(e), repr(e)  # one line, as the CLI prints it
        return
    # Loaded: it runs, and its config is one that config.json expresses.
    c = model.config
    ids = torch.randint(0, c.vocab_size, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(ids).shape == (1, 6, c.vocab_size)
    with contextlib.suppress(LmforgeError):  # e.g. a context shorter than the prompt: said, not crashed
        lmforge.generate(model, ids[0].tolist(), max_new_tokens=2)
    assert ModelConfig.from_hf(json.loads(json.dumps(c.to_hf()))) == c


def test_the_seeds_load(checkpoints) -> None:
    """The unmutated checkpoints load, so the property above is not vacuous."""
    for path, config in checkpoints.values():
        (path / "config.json").write_text(json.dumps(config))
        lmforge.load_pretrained(path)
