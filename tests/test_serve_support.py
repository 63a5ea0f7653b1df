"""Helpers shared by tests/test_serve*.py (this file holds no tests): a tiny random model directory with a
real tokenizer, and `lmforge serve`'s app running under uvicorn on a free loopback port in a thread."""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import randomize_

import lmforge
from lmforge import ModelConfig, Transformer
from lmforge.tokenizer import Tokenizer

pytest.importorskip("fastapi", reason="the serve extra: pip install 'lmforge[serve]'")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from lmforge.generate.engine import EngineConfig  # noqa: E402
from lmforge.serve import ServeConfig  # noqa: E402
from lmforge.serve.server import bind, create_app, engine_loader  # noqa: E402
from lmforge.serve.state import Loaded  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b\n",
    "Hello world, hello again, world of words and worlds.",
]
CONTEXT = 1024  # long enough that a request generating to the end runs for about a second


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One intra-op thread while a serve module runs. The model is tiny, and the server's threads (uvicorn's
    loop, the engine, the test's clients) share two cores with PyTorch's OpenMP team: when the machine is
    busy, two OpenMP threads made each decode step 5-20x slower (measured), one thread never."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def make_model_dir(path: Path) -> Path:
    """A tiny random Llama-3-style model (300-token BPE with the llama3 chat format) saved as an HF directory."""
    tok = Tokenizer.train(TEXTS * 20, 300, "llama3", min_frequency=1)
    config = ModelConfig.from_preset("tiny-llama").replace(
        vocab_size=tok.vocab_size,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tuple(tok.stop_token_ids),
        max_position_embeddings=CONTEXT,
    )
    with torch.no_grad():
        model = randomize_(Transformer(config), std=0.2).eval()
    lmforge.save_pretrained(model, path)
    tok.save(path)
    return path


class Server:
    """The real app (engine and all) under uvicorn in a daemon thread; a context manager."""

    def __init__(self, model_dir: Path | None = None, *, load: Any = None, wait: bool = True, **options: Any) -> None:
        engine_fields = {f.name for f in dataclasses.fields(EngineConfig)}
        self.config = ServeConfig(**{k: v for k, v in options.items() if k not in engine_fields})
        self.engine_config = EngineConfig(**{k: v for k, v in options.items() if k in engine_fields})
        self.app = create_app(self.config, load or engine_loader(model_dir, self.config, self.engine_config))
        self.wait = wait
        self.url = ""

    def __enter__(self) -> Server:
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        if self.wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.02)
        raise TimeoutError("the server did not become ready")

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    # --- conveniences -----------------------------------------------------------------------------------
    @property
    def loaded(self) -> Loaded:
        return self.app.state.lmforge.loaded

    @property
    def engine(self) -> Any:
        return self.loaded.engine

    @property
    def model_name(self) -> str:
        return self.loaded.model_name

    def post(self, path: str, body: Any, **kw: Any) -> httpx.Response:
        return httpx.post(self.url + path, json=body, timeout=kw.pop("timeout", 30), **kw)

    def complete(self, **body: Any) -> dict[str, Any]:
        r = self.post("/v1/completions", {"temperature": 0, **body})
        assert r.status_code == 200, r.text
        return r.json()

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics by name (labels dropped: one model, and labelled counters summed)."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[s.name] = out.get(s.name, 0.0) + s.value
        return out

    def wait_idle(self, timeout: float = 10.0) -> dict[str, int]:
        """engine.stats() once nothing runs or waits and no KV block is held (or the last one at timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            stats = self.engine.stats()
            idle = stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_blocks_used"] == 0
            if idle or time.monotonic() > deadline:
                return stats
            time.sleep(0.01)
