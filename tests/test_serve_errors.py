"""`lmforge serve`'s refusals, limits and security, each in OpenAI's error shape ({"error": {"message",
"type", "param", "code"}}): 400 unknown fields and context overflow, 413 above the body cap, 422 bad
values, 429 with Retry-After when the queue is full, 401 without the right key (health and metrics open),
504 past the request timeout, and schemathesis's generated requests against /openapi.json (no 5xx)."""

from __future__ import annotations

import threading
import time

import pytest
from test_serve_support import CONTEXT, Server, httpx, make_model_dir, one_torch_thread  # noqa: F401

openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_model_dir(tmp_path_factory.mktemp("serve-errors-model"))


@pytest.fixture(scope="module")
def server(model_dir):
    with Server(model_dir, max_body_bytes=4096, max_tokens_cap=64, max_n=4) as s:
        yield s


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def rejected(server) -> dict[str, float]:
    """lmforge:request_rejected_total by status."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics").text
    return {
        s.labels["status"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "lmforge:request_rejected_total"
    }


CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}


# --- 400 ----------------------------------------------------------------------------------------------------
def test_unknown_fields_are_400_naming_them(server):
    e = error_of(server.post("/v1/completions", {"prompt": "Hi", "max_token": 5}), 400)
    assert "max_token" in e["message"] and e["param"] == "max_token" and e["code"] == "unknown_field"
    e = error_of(
        server.post("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "x", "mood": "happy"}]}),
        400,
    )
    assert e["param"] == "messages[0].mood"
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="frobnicate"):
        client.completions.create(model=server.model_name, prompt="Hi", extra_body={"frobnicate": 1})
    error_of(
        httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
        400,
    )
    error_of(server.post("/v1/completions", [1, 2]), 400)  # JSON, but not an object


def test_prompt_plus_max_tokens_beyond_the_context_is_400_with_both_numbers(server):
    ids = [5] * (CONTEXT - 10)
    e = error_of(server.post("/v1/completions", {"prompt": ids, "max_tokens": 40}), 400)
    assert e["code"] == "context_length_exceeded"
    for number in (CONTEXT, CONTEXT - 10, 40, CONTEXT + 30):
        assert str(number) in e["message"], e["message"]
    # the chat default max_tokens is what the context leaves; a prompt that fills it leaves nothing
    long = {"messages": [{"role": "user", "content": "a " * (CONTEXT + 10)}]}
    e = error_of(server.post("/v1/chat/completions", long), 400)
    assert e["code"] == "context_length_exceeded" and str(CONTEXT) in e["message"]
    # one prompt too long in a list refuses the request whole: nothing is left running
    error_of(server.post("/v1/completions", {"prompt": [[5, 6], ids], "max_tokens": 40}), 400)
    assert server.wait_idle()["waiting"] == 0


def test_limits_of_this_server_are_400(server):
    e = error_of(server.post("/v1/completions", {"prompt": "Hi", "max_tokens": 65}), 400)
    assert "65" in e["message"] and "64" in e["message"] and e["param"] == "max_tokens"
    e = error_of(server.post("/v1/completions", {"prompt": "Hi", "n": 5}), 400)
    assert e["param"] == "n"
    for field, value in (("logit_bias", {"5": 1.0}), ("suffix", "end"), ("best_of", 3)):
        e = error_of(server.post("/v1/completions", {"prompt": "Hi", field: value}), 400)
        assert e["param"] == field


# --- 413 ------------------------------------------------------------------------------------------------------
def test_bodies_above_the_cap_are_413_by_length_and_when_chunked(server):
    big = {"prompt": "a" * 5000}
    e = error_of(server.post("/v1/completions", big), 413)
    assert "4096" in e["message"] and e["code"] == "payload_too_large"

    def chunks():
        for _ in range(10):
            yield b" " * 1000  # no Content-Length: counted as it arrives

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert error_of(r, 413)["code"] == "payload_too_large"


# --- 422 ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "Hi", "temperature": -1}, "temperature"),
        ({"prompt": "Hi", "temperature": 1e-300}, "temperature"),  # fp32 logits / 1e-300 = inf: NaN sampling
        ({"prompt": "Hi", "repetition_penalty": 1e-300}, "repetition_penalty"),
        ({"prompt": "Hi", "top_p": 0}, "top_p"),
        ({"prompt": "Hi", "n": 0}, "n"),
        ({"prompt": "Hi", "logprobs": 99}, "logprobs"),
        ({"prompt": "Hi", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "Hi", "max_tokens": 0}, "max_tokens"),  # 0 only with echo
        ({"prompt": []}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": [1, "a"]}, "prompt"),
        ({"prompt": [299, 300, 10**6]}, "prompt"),  # beyond the vocabulary
        ({"prompt": "Hi", "stop": [""]}, "stop"),
        ({}, "prompt"),
    ],
)
def test_invalid_values_are_422(server, body, param):
    e = error_of(server.post("/v1/completions", body), 422)
    assert e["param"].startswith(param), e
    assert e["type"] == "invalid_request_error"


def test_invalid_chat_values_are_422(server):
    assert error_of(server.post("/v1/chat/completions", {**CHAT, "top_logprobs": 2}), 422)["param"] == "top_logprobs"
    assert error_of(server.post("/v1/chat/completions", {"messages": []}), 422)["param"].startswith("messages")
    bad_format = {**CHAT, "response_format": {"type": "xml"}}
    assert error_of(server.post("/v1/chat/completions", bad_format), 422)["param"].startswith("response_format")
    assert error_of(server.post("/detokenize", {"tokens": [10**6]}), 422)["param"].startswith("tokens")


def test_unknown_model_and_path_are_404(server):
    e = error_of(server.post("/v1/completions", {"prompt": "Hi", "model": "gpt-4"}), 404)
    assert server.model_name in e["message"] and e["code"] == "model_not_found"
    error_of(httpx.get(server.url + "/v1/nothing"), 404)
    error_of(httpx.get(server.url + "/v1/completions"), 405)


# --- 429 ------------------------------------------------------------------------------------------------------
def test_a_full_queue_is_429_with_retry_after(model_dir):
    long = {"prompt": "The quick", "max_tokens": CONTEXT - 10, "ignore_eos": True, "temperature": 0, "stream": True}
    with Server(model_dir, max_batch=1, max_waiting=1) as s:
        with httpx.stream("POST", s.url + "/v1/completions", json=long, timeout=30) as running:
            chunks = running.iter_bytes()  # held: a dropped iterator closes the response
            next(chunks)  # the only batch slot is taken
            queued: list[httpx.Response] = []
            waiter = threading.Thread(
                target=lambda: queued.append(s.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2}))
            )
            waiter.start()
            deadline = time.monotonic() + 5
            while s.engine.stats()["waiting"] < 1:  # the queue (of one) is full
                assert time.monotonic() < deadline
                time.sleep(0.005)
            t0 = time.perf_counter()
            assert httpx.get(s.url + "/health").status_code == 200  # answered while the engine is busy
            assert time.perf_counter() - t0 < 1.0
            r = s.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2})
            e = error_of(r, 429)
            assert r.headers["retry-after"] == "1" and e["type"] == "rate_limit_error" and e["code"] == "queue_full"
            client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model=s.model_name, messages=CHAT["messages"], max_tokens=2)
            assert rejected(s)["429"] == 2
        waiter.join(10)  # the streamed request was cancelled by the hang-up: the queued one ran
        assert queued[0].status_code == 200
        assert s.wait_idle()["kv_blocks_used"] == 0


# --- 401 ------------------------------------------------------------------------------------------------------
def test_api_key_is_required_on_the_api_and_not_on_health_or_metrics(model_dir):
    with Server(model_dir, api_key="k3y") as s:
        body = {"prompt": "Hi", "max_tokens": 2}
        r = s.post("/v1/completions", body)
        e = error_of(r, 401)
        assert (
            r.headers["www-authenticate"] == "Bearer"
            and e["code"] == "invalid_api_key"
            and "no API key" in e["message"]
        )
        for header in ("Bearer k3y-not", "Bearer", "Basic k3y", "k3y", "Bearer K3Y"):
            error_of(s.post("/v1/completions", body, headers={"Authorization": header}), 401)
        for path in ("/v1/models", "/tokenizer_info"):
            error_of(httpx.get(s.url + path), 401)
        error_of(s.post("/tokenize", {"prompt": "x"}), 401)
        assert s.post("/v1/completions", body, headers={"Authorization": "Bearer k3y"}).status_code == 200
        assert httpx.get(s.url + "/health").status_code == 200
        assert httpx.get(s.url + "/").status_code == 200  # the chat page asks for the key itself
        assert rejected(s)["401"] == 9  # /metrics needs no key either
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=s.url + "/v1", api_key="k3y", max_retries=0)
        assert good.completions.create(model=s.model_name, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1


# --- 504 ------------------------------------------------------------------------------------------------------
def test_requests_past_the_timeout_are_cancelled_504(model_dir):
    long = {"prompt": "The quick", "max_tokens": CONTEXT - 10, "ignore_eos": True, "temperature": 0}
    with Server(model_dir, request_timeout=0.05) as s:  # far less than ~1000 tokens take
        e = error_of(s.post("/v1/completions", long), 504)
        assert e["code"] == "timeout" and "0.05 s" in e["message"]
        assert s.wait_idle()["kv_blocks_used"] == 0
        with httpx.stream("POST", s.url + "/v1/completions", json={**long, "stream": True}, timeout=30) as r:
            raw = b"".join(r.iter_bytes())
        events = raw.split(b"\n\n")
        assert events[-2] == b"data: [DONE]" and b'"code":"timeout"' in events[-3]
        assert s.wait_idle()["kv_blocks_used"] == 0
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIError, match="did not finish"):
            list(
                client.completions.create(
                    model=s.model_name,
                    prompt="The quick",
                    max_tokens=CONTEXT - 10,
                    temperature=0,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
            )


# --- generated requests ---------------------------------------------------------------------------------------
def test_schemathesis_finds_no_server_error(model_dir):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    with Server(model_dir, max_tokens_cap=8, max_n=2, max_body_bytes=1 << 16) as s:
        schema = schemathesis.openapi.from_url(s.url + "/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize"}
        failures = []
        for op in operations:

            @settings(
                max_examples=12, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
            )
            @given(case=op.as_strategy())
            def run(case) -> None:
                response = case.call(base_url=s.url, timeout=30)
                if response.status_code >= 500:
                    failures.append((case.method, case.path, case.body, response.status_code, response.text[:300]))

            run()
        assert failures == []
        assert httpx.get(s.url + "/health").status_code == 200  # the engine survived it all
