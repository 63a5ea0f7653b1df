"""`lmforge serve` end to end: the real app and engine over a tiny random model on a loopback port, driven by
the official openai client, raw HTTP (SSE framing byte by byte), lm-eval's local-completions model and the
CLI. Outputs are compared as token ids and texts: continuous batching, prefix caching and preemption must
not change what a request gets. Errors, limits and security are in test_serve_errors.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from test_serve_support import CONTEXT, Server, httpx, make_model_dir, one_torch_thread  # noqa: F401

from lmforge.serve.state import Loaded

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("serve-model"))


@pytest.fixture(scope="module")
def server(model_dir):
    with Server(model_dir) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def ids_of(server, text: str) -> list[int]:
    r = server.post("/tokenize", {"prompt": text})
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


# --- loading and the command line ---------------------------------------------------------------------
def test_health_is_503_while_loading_then_200(model_dir):
    from lmforge.serve import ServeConfig
    from lmforge.serve.server import engine_loader

    release = threading.Event()
    load = engine_loader(model_dir, ServeConfig())

    def slow_load() -> Loaded:  # the real loader, once the test lets it
        assert release.wait(20)
        return load()

    with Server(load=slow_load, wait=False) as s:
        deadline = time.monotonic() + 10
        while True:  # the socket is up while the model loads
            try:
                r = httpx.get(s.url + "/health", timeout=1)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.02)
        assert r.status_code == 503 and r.json()["status"] == "loading" and r.headers["retry-after"] == "1"
        busy = s.post("/v1/completions", {"prompt": "x"})
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "loading"
        assert httpx.get(s.url + "/").status_code == 200  # the chat page (or a pointer to the API) needs no model
        assert httpx.get(s.url + "/metrics").status_code == 200  # scrapable, without engine samples yet
        release.set()
        s.wait_ready()
        assert httpx.get(s.url + "/health").json() == {"status": "ok"}
        assert s.complete(prompt="The quick", max_tokens=2)["usage"]["completion_tokens"] >= 1


def test_cli_prints_url_and_curl_serves_with_env_key_and_stops_on_ctrl_c(model_dir):
    env = {**os.environ, "LMFORGE_API_KEY": "sekrit", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lmforge", "serve", "--model", str(model_dir), "--port", "0", "--max-batch", "2"],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        first = proc.stderr.readline()
        assert first.startswith(f"serving {model_dir} at http://127.0.0.1:"), first
        url = first.split(" at ")[1].split()[0]
        curl = proc.stderr.readline()
        assert curl.startswith(f"try: curl {url}/v1/completions") and "Authorization: Bearer $LMFORGE_API_KEY" in curl
        deadline = time.monotonic() + 30
        while httpx.get(url + "/health", timeout=2).status_code != 200:  # the socket answers from the start
            assert time.monotonic() < deadline
            time.sleep(0.05)
        body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0}
        assert httpx.post(url + "/v1/completions", json=body).status_code == 401  # the key came from the env
        ok = httpx.post(url + "/v1/completions", json=body, headers={"Authorization": "Bearer sekrit"})
        assert ok.status_code == 200 and ok.json()["model"] == model_dir.name
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=20)
    # uvicorn shuts down gracefully (the lifespan stops the engine), then re-raises the signal: the CLI's
    # usual Ctrl-C exit
    assert proc.returncode == 130 and "Application shutdown complete" in err and err.endswith("interrupted\n"), err


def test_serve_flags_are_generated_from_serve_config(capsys):
    import argparse

    from lmforge.cli import build_parser, main
    from lmforge.commands.flags import Options
    from lmforge.generate.engine import EngineConfig
    from lmforge.options import specs
    from lmforge.serve import ServeConfig

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["serve"]
    by_dest = {a.dest: a for a in sub._actions}
    for cls in (ServeConfig, EngineConfig):
        for spec in specs(cls):
            assert by_dest[spec.name].default is argparse.SUPPRESS and spec.help  # defaults live in the dataclass
    assert Options(parser.parse_args(["serve", "--model", "m"])).build(ServeConfig) == ServeConfig()
    assert ServeConfig().host == "127.0.0.1"  # loopback unless asked
    given = Options(parser.parse_args(["serve", "--model", "m", "--kv-blocks", "0", "--no-prefix-caching"]))
    assert given.build(EngineConfig).prefix_caching is False
    assert main(["serve", "--model", "m", "--max-batch", "0"]) == 2
    assert capsys.readouterr().err == "lmforge serve: error: max_batch must be at least 1, got 0.\n"


def test_cli_refuses_a_missing_model_in_one_line(tmp_path, capsys):
    from lmforge.cli import main

    assert main(["serve", "--model", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lmforge serve: error: --model") and "no such directory" in err


def test_cli_stops_with_one_line_when_the_model_fails_to_load(model_dir, tmp_path, capsys):
    import shutil

    from lmforge.cli import main

    for name in ("config.json", "model.safetensors"):  # weights without their tokenizer
        shutil.copy(model_dir / name, tmp_path / name)
    assert main(["serve", "--model", str(tmp_path), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(f"serving {tmp_path} at http://127.0.0.1:")
    assert err[-1].startswith("lmforge serve: error: the model failed to load:") and "tokenizer.json" in err[-1]


# --- the openai client ----------------------------------------------------------------------------------
def test_openai_client_completions_plain_and_streamed_agree(client, server):
    assert [m.id for m in client.models.list().data] == [server.model_name]
    full = client.completions.create(
        model=server.model_name, prompt="The quick brown", max_tokens=12, temperature=0, logprobs=2
    )
    (choice,) = full.choices
    assert choice.finish_reason in ("stop", "length") and full.usage.prompt_tokens == len(
        ids_of(server, "The quick brown")
    )
    assert len(choice.logprobs.tokens) == full.usage.completion_tokens == len(choice.logprobs.token_logprobs)
    assert all(
        len(top) <= 2 and max(top.values()) >= lp - 1e-6
        for top, lp in zip(choice.logprobs.top_logprobs, choice.logprobs.token_logprobs, strict=True)
    )
    assert choice.logprobs.text_offset[0] == 0 and choice.logprobs.text_offset == sorted(choice.logprobs.text_offset)
    stream = client.completions.create(
        model=server.model_name,
        prompt="The quick brown",
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_openai_client_chat_plain_and_streamed_agree(client, server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]
    full = client.chat.completions.create(
        model=server.model_name, messages=messages, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3
    )
    (choice,) = full.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    rendered = server.post("/tokenize", {"messages": messages}).json()["tokens"]
    assert full.usage.prompt_tokens == len(rendered)
    content = choice.logprobs.content
    assert len(content) == full.usage.completion_tokens and all(len(e.top_logprobs) == 3 for e in content)
    assert all(e.top_logprobs[0].logprob >= e.logprob - 1e-6 for e in content)
    chunks = list(
        client.chat.completions.create(
            model=server.model_name, messages=messages, max_tokens=10, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_json_schema_response_format_gives_valid_json(server):
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "color": {"enum": ["red", "green", "blue"]}},
        "required": ["ok", "color"],
        "additionalProperties": False,
    }
    body = {
        "messages": [{"role": "user", "content": "Give me JSON"}],
        "max_tokens": 60,
        "temperature": 0.8,
        "seed": 3,
        "n": 3,
        "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}},
    }
    r = server.post("/v1/chat/completions", body)
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        value = json.loads(choice["message"]["content"])
        assert choice["finish_reason"] == "stop" and set(value) == {"ok", "color"}
        assert isinstance(value["ok"], bool) and value["color"] in ("red", "green", "blue")
    bad = dict(
        body, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    )
    assert server.post("/v1/chat/completions", bad).status_code == 400


# --- the wire format --------------------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
def test_sse_framing_byte_by_byte(server, endpoint):
    body = {"max_tokens": 6, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "n": 2}
    body.update(
        {"prompt": "Hello"} if endpoint == "/v1/completions" else {"messages": [{"role": "user", "content": "Hi"}]}
    )
    with httpx.stream("POST", server.url + endpoint, json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = b"".join(r.iter_bytes())
    assert raw.endswith(b"data: [DONE]\n\n") and raw.count(b"data: [DONE]") == 1
    events = raw.split(b"\n\n")
    assert events[-1] == b"" and events[-2] == b"data: [DONE]"
    payloads = []
    for event in events[:-2]:
        assert event.startswith(b"data: {") and b"\n" not in event and b"\r" not in event, event
        payloads.append(json.loads(event[len(b"data: ") :]))
    *content, last = payloads
    assert (
        last["choices"] == []
        and last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + last["usage"]["completion_tokens"]
    )
    assert all(len(p["choices"]) == 1 and "usage" not in p for p in content)
    assert len({p["id"] for p in payloads}) == 1
    for index in (0, 1):
        mine = [p["choices"][0] for p in content if p["choices"][0]["index"] == index]
        assert [c["finish_reason"] for c in mine][:-1] == [None] * (len(mine) - 1)
        assert mine[-1]["finish_reason"] in ("stop", "length")
    assert last["usage"]["completion_tokens"] <= 12


def test_prompt_forms_and_echo(server):
    text = "Hello world"
    ids = ids_of(server, text)  # with BOS, as a text prompt gets
    assert ids[0] == server.loaded.tokenizer.bos_token_id
    a = server.complete(prompt=text, max_tokens=5)["choices"][0]["text"]
    many = server.complete(prompt=[text, "Paris"], max_tokens=5)["choices"]
    as_ids = server.complete(prompt=ids, max_tokens=5)["choices"][0]["text"]
    lists = server.complete(prompt=[ids, ids_of(server, "Paris")], max_tokens=5)["choices"]
    assert [c["index"] for c in many] == [0, 1] and many[0]["text"] == a == as_ids == lists[0]["text"]
    assert many[1]["text"] == lists[1]["text"]
    echo = server.complete(prompt=text, max_tokens=3, echo=True)["choices"][0]["text"]
    assert (
        echo.startswith(text) and echo[len(text) :] == server.complete(prompt=text, max_tokens=3)["choices"][0]["text"]
    )
    # echo with max_tokens 0: the prompt's tokens scored, the first without a logprob (nothing precedes it)
    scored = server.complete(prompt=ids, max_tokens=0, echo=True, logprobs=1)
    lp = scored["choices"][0]["logprobs"]
    assert scored["usage"]["completion_tokens"] == 0 and scored["choices"][0]["finish_reason"] == "length"
    assert len(lp["tokens"]) == len(ids) and lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert all(v < 0 for v in lp["token_logprobs"][1:]) and all(len(t) == 1 for t in lp["top_logprobs"][1:])
    assert "".join(lp["tokens"]) == scored["choices"][0]["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids))]


def test_stop_strings_end_the_text_before_them(server):
    full = server.complete(prompt="The quick brown", max_tokens=20, ignore_eos=True)["choices"][0]["text"]
    k = next(i for i in range(2, len(full) - 2) if full[i : i + 2].isascii() and full.index(full[i : i + 2]) == i)
    for stop in (full[k : k + 2], ["never-there", full[k : k + 2]]):
        for stream in (False, True):
            body = {"prompt": "The quick brown", "max_tokens": 20, "ignore_eos": True, "temperature": 0, "stop": stop}
            if stream:
                with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as r:
                    events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
                text = "".join(e["choices"][0]["text"] for e in events)
                reason = events[-1]["choices"][0]["finish_reason"]
            else:
                choice = server.post("/v1/completions", body).json()["choices"][0]
                text, reason = choice["text"], choice["finish_reason"]
            assert text == full[:k] and reason == "stop", (stop, stream, text)


# --- scheduling does not change outputs -------------------------------------------------------------------
PROMPTS = [
    "The quick brown fox",
    "Paris is the capital",
    "def add(a, b):",
    "Hello again, world",
    "Berlin is",
    "words and worlds",
    "the lazy dog",
    "return a + b",
]


def test_eight_concurrent_greedy_requests_equal_each_alone(server):
    alone = [server.complete(prompt=p, max_tokens=24 + 3 * i, logprobs=0) for i, p in enumerate(PROMPTS)]
    with ThreadPoolExecutor(8) as pool:
        together = list(
            pool.map(
                lambda ip: server.complete(prompt=ip[1], max_tokens=24 + 3 * ip[0], logprobs=0), enumerate(PROMPTS)
            )
        )
    for a, b in zip(alone, together, strict=True):
        assert b["choices"][0]["text"] == a["choices"][0]["text"]
        assert b["choices"][0]["logprobs"]["tokens"] == a["choices"][0]["logprobs"]["tokens"]
        assert b["choices"][0]["logprobs"]["token_logprobs"] == pytest.approx(
            a["choices"][0]["logprobs"]["token_logprobs"], abs=1e-4
        )


def test_seeded_sampling_is_the_same_alone_and_under_load(server):
    body = {
        "prompt": "The quick brown fox",
        "max_tokens": 30,
        "temperature": 1.0,
        "top_p": 0.9,
        "seed": 1234,
        "n": 3,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.2,
    }
    alone = server.post("/v1/completions", body).json()["choices"]
    with ThreadPoolExecutor(5) as pool:
        noise = [
            pool.submit(server.complete, prompt=p, max_tokens=40, temperature=0.9, seed=i)
            for i, p in enumerate(PROMPTS[:4])
        ]
        loaded = pool.submit(server.post, "/v1/completions", body).result().json()["choices"]
        [f.result() for f in noise]
    assert [c["text"] for c in loaded] == [c["text"] for c in alone]
    assert len({c["text"] for c in alone}) > 1  # the n choices have seeds of their own
    one = server.post("/v1/completions", {**body, "n": 1}).json()["choices"]
    assert one[0]["text"] == alone[0]["text"]  # choice 0 uses the request's own seed
    other = server.post("/v1/completions", {**body, "n": 1, "seed": 4321}).json()["choices"]
    assert other[0]["text"] != alone[0]["text"]


def test_prefix_cache_hit_on_a_shared_prefix_keeps_the_output(server, model_dir):
    shared = list(range(10, 10 + 40))  # 40 token ids: two full blocks of 16
    first, second = shared + [100, 101], shared + [120, 121, 122]
    with Server(model_dir, prefix_caching=False) as cold:
        want = cold.complete(prompt=second, max_tokens=20, logprobs=0)["choices"][0]
        assert cold.metrics()["lmforge:prefix_cache_hits_total"] == 0
    before = server.metrics()
    server.complete(prompt=first, max_tokens=5)
    got = server.complete(prompt=second, max_tokens=20, logprobs=0)["choices"][0]
    after = server.metrics()
    assert after["lmforge:prefix_cache_hits_total"] - before["lmforge:prefix_cache_hits_total"] >= 32
    assert after["lmforge:prefix_cache_queries_total"] - before["lmforge:prefix_cache_queries_total"] == len(
        first
    ) + len(second)
    assert got["text"] == want["text"] and got["logprobs"]["tokens"] == want["logprobs"]["tokens"]
    assert got["logprobs"]["token_logprobs"] == pytest.approx(want["logprobs"]["token_logprobs"], abs=1e-4)


def test_preemption_under_tiny_kv_cache_keeps_outputs(server, model_dir):
    # each request (20 + 100 tokens) needs 8 blocks of 16 at the end; 10 blocks (9 usable) hold only one
    bodies = [
        {"prompt": (ids_of(server, p) * 8)[:16] + [7, 8, 9, 10], "max_tokens": 100, "ignore_eos": True, "logprobs": 0}
        for p in PROMPTS[:4]
    ]
    want = [server.complete(**b)["choices"][0] for b in bodies]
    with Server(model_dir, kv_blocks=10, max_batch=4) as small, ThreadPoolExecutor(4) as pool:
        got = [r["choices"][0] for r in pool.map(lambda b: small.complete(**b), bodies)]
        assert small.metrics()["lmforge:num_preemptions_total"] > 0
        assert small.wait_idle()["kv_blocks_used"] == 0
    for g, w in zip(got, want, strict=True):
        assert g["finish_reason"] == "length" and g["text"] == w["text"]
        assert g["logprobs"]["tokens"] == w["logprobs"]["tokens"]


# --- disconnects free the engine ----------------------------------------------------------------------------
def _labelled(server, name: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        for s in family.samples:
            if s.name == name:
                out[s.labels.get("finished_reason", "")] = s.value
    return out


def test_client_disconnect_cancels_the_request_and_frees_its_blocks(server):
    aborted = _labelled(server, "lmforge:request_success_total").get("abort", 0.0)
    body = {"prompt": "The quick", "max_tokens": CONTEXT - 10, "ignore_eos": True, "temperature": 0}
    # streamed: hang up after the first chunk
    with httpx.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=30) as r:
        chunks = r.iter_bytes()  # held: a dropped iterator closes the response (a hang-up of its own)
        next(chunks)
        time.sleep(0.1)
        assert server.engine.stats()["kv_blocks_used"] > 0 and server.engine.stats()["running"] == 1
    stats = server.wait_idle(timeout=5)
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0
    # not streamed: the client gives up waiting
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions", json=body, timeout=httpx.Timeout(30, read=0.1))
    stats = server.wait_idle(timeout=5)
    assert stats["kv_blocks_used"] == 0 and stats["running"] == 0
    # both ended as cancelled ("abort"), long before the ~1000 tokens they asked for
    assert _labelled(server, "lmforge:request_success_total").get("abort", 0.0) == aborted + 2


# --- metrics, tokenizer endpoints, lm-eval -------------------------------------------------------------------
def test_metrics_have_vllm_like_names_and_latencies(server):
    server.complete(prompt="Hello", max_tokens=4)
    m = server.metrics()
    for name in (
        "lmforge:num_requests_running",
        "lmforge:num_requests_waiting",
        "lmforge:kv_cache_usage_perc",
        "lmforge:kv_cache_blocks_used",
        "lmforge:prefix_cache_hits_total",
        "lmforge:prefix_cache_queries_total",
        "lmforge:prompt_tokens_total",
        "lmforge:generation_tokens_total",
        "lmforge:num_preemptions_total",
    ):
        assert name in m, name
    assert m["lmforge:time_to_first_token_seconds_count"] >= 1 and m["lmforge:time_to_first_token_seconds_sum"] > 0
    assert m["lmforge:inter_token_latency_seconds_count"] >= 3
    assert m["lmforge:e2e_request_latency_seconds_count"] >= 1
    assert m["lmforge:generation_tokens_total"] == server.engine.stats()["generated_tokens"]
    assert 0 <= m["lmforge:kv_cache_usage_perc"] <= 1


def test_tokenizer_endpoints_as_lm_eval_remote_tokenizer_reads_them(server, model_dir):
    from lm_eval.utils import RemoteTokenizer, check_remote_tokenizer_support

    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.from_pretrained(model_dir)
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == "<|end_of_text|>" and info["bos_token"] == "<|begin_of_text|>"
    assert info["model_max_length"] == CONTEXT and "<|start_header_id|>" in info["chat_template"]
    r = server.post("/tokenize", {"prompt": "Hello world", "add_special_tokens": False}).json()
    assert r == {"tokens": tok.encode("Hello world"), "count": len(tok.encode("Hello world")), "max_model_len": CONTEXT}
    assert server.post("/detokenize", {"tokens": tok.encode("Hello world")}).json() == {"prompt": "Hello world"}
    assert check_remote_tokenizer_support(server.url + "/v1/completions")
    remote = RemoteTokenizer(server.url + "/v1/completions")
    assert remote.eos_token_id == tok.eos_token_id and remote.bos_token_id == tok.bos_token_id
    assert remote.encode("def add(a, b):") == tok.encode("def add(a, b):")
    assert remote.decode(tok.encode("Paris")) == "Paris"


def test_lm_eval_local_completions_scores_equal_the_in_process_adapter(server, model_dir):
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from lmforge.eval.harness import LmforgeLM

    # lm-eval's API models never add BOS to remote-tokenized contexts, while lmforge's adapter (like lm-eval's
    # HF backend) does; contexts that start with the BOS text tokenize the same in both.
    bos = "<|begin_of_text|>"
    pairs = [
        (bos + "The quick brown", " fox jumps"),
        (bos + "Paris is the cap", "ital of France"),
        (bos + "def add(a, b):\n    ", "return a + b"),
        ("", "Hello world"),
        (bos + "Hello wor", "ld, hello"),
    ]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    remote = LocalCompletionsAPI(
        base_url=server.url + "/v1/completions", model=server.model_name, tokenizer_backend="remote", max_length=CONTEXT
    )
    ours = LmforgeLM(pretrained=str(model_dir), batch_size=2)
    got = remote.loglikelihood(requests, disable_tqdm=True)
    want = ours.loglikelihood(requests, disable_tqdm=True)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)
    assert all(g[0] < 0 for g in got)
