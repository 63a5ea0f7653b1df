"""The web chat page at `/` (lmforge/serve/static/index.html) in a real browser: Debian's chromium, headless,
driven by Playwright, against the real server and engine over a tiny random model (its replies are gibberish;
what is checked is the streaming, the conversation, the controls and the engine's bookkeeping).

Every request the page makes to /v1/chat/completions goes through `page.route`, which records the body and
headers the page sent and adds `ignore_eos` (a vLLM extension the page never sends), so that a reply runs
to max_tokens and streams for a while instead of ending at a random end-of-turn token."""

from __future__ import annotations

import json
import re
import shutil
import time
from typing import Any

import pytest
from test_serve_support import Server, httpx, make_model_dir, one_torch_thread  # noqa: F401

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="the browser test needs Playwright: pip install 'lmforge[dev]' (or playwright)"
)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip(
        "the browser test needs Debian's chromium on PATH: apt-get install chromium (.ci/run installs it)",
        allow_module_level=True,
    )

KEY = "web-sekrit"
# The tiny model makes up to ~1000 tokens/s on an idle machine, and a loaded one can delay a look at the page
# by half a second: the replies are long enough that the test sees one grow, and stops one, whatever the load.
STREAMED = 600  # the first reply of the streaming test
LONG = 4000  # the reply the stop button interrupts (several seconds), under ServeConfig's max_tokens_cap
CONTEXT = 8192  # room for LONG (the shared helper's model has 1024 positions)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = make_model_dir(tmp_path_factory.mktemp("webchat-model"))
    config = json.loads((path / "config.json").read_text())
    config["max_position_embeddings"] = CONTEXT  # RoPE has no weights: the same random model, a longer context
    (path / "config.json").write_text(json.dumps(config))
    with Server(path, api_key=KEY) as s:
        assert s.loaded.max_context == CONTEXT
        yield s


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


class Chat:
    """One browser page on the chat, with what it sent to the API."""

    def __init__(self, page: Any, base: str) -> None:
        self.page = page
        self.base = base
        self.sent: list[dict[str, Any]] = []  # {"body": ..., "authorization": ...} per chat request
        self.urls: list[str] = []  # every URL the page requested
        self.errors: list[str] = []  # uncaught exceptions in the page's script, and what its CSP blocked
        page.on("request", lambda r: self.urls.append(r.url))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        page.on("console", lambda m: "Content Security Policy" in m.text and self.errors.append(m.text))
        page.route("**/v1/chat/completions", self._intercept)

    def _intercept(self, route: Any) -> None:
        request = route.request
        body = request.post_data_json
        self.sent.append({"body": body, "authorization": request.headers.get("authorization")})
        route.continue_(post_data=json.dumps({**body, "ignore_eos": True}))

    def open(self) -> Chat:
        self.page.goto(self.base + "/")
        return self

    def settings(self, **fields: str) -> None:
        self.page.click("#settings-panel > summary")
        for name, value in fields.items():
            self.page.fill("#" + name.replace("_", "-"), value)

    def replies(self) -> list[str]:
        return self.page.eval_on_selector_all(".message.assistant .content", "els => els.map(e => e.textContent)")

    def last_reply_length(self) -> int:
        return self.look()[0]

    def look(self) -> tuple[int, bool, str]:
        """(the last reply's length, whether the page says it is done, the rate shown), in one round trip."""
        length, done, rate = self.page.evaluate(
            "() => { const m = document.querySelectorAll('.message.assistant .content');"
            " const rate = document.querySelector('#rate');"
            " return [m.length ? m[m.length - 1].textContent.length : 0, rate.dataset.done === 'true',"
            " rate.textContent]; }"
        )
        return length, done, rate

    def wait_done(self) -> None:
        self.page.wait_for_selector("#rate[data-done=true]")
        self.page.wait_for_function("() => !document.querySelector('#send').disabled")

    def rate(self) -> float:
        shown = self.page.text_content("#rate")
        number = re.match(r"(\d+(?:\.\d+)?) tokens/s", shown)
        assert number is not None, shown
        assert float(self.page.get_attribute("#rate", "data-tokens-per-second")) == pytest.approx(
            float(number.group(1)), abs=0.051
        )
        return float(number.group(1))


@pytest.fixture
def chat(browser, server):
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(10_000)
    chat = Chat(page, server.url).open()
    yield chat
    context.close()
    assert not chat.errors, chat.errors


def test_page_is_one_self_contained_file_and_keeps_the_api_key(server, chat):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert not re.search(r"https?://", r.text)  # no CDN, font or script from elsewhere
    assert not re.search(r"""(?:src|href)\s*=\s*["'](?!data:)""", r.text)  # nothing linked but data: URLs
    page = chat.page
    # without the key the API answers 401: the turn is undone, the text put back and the error shown
    page.fill("#input", "hello?")
    page.click("#send")
    page.wait_for_selector("#error:has-text('API key')")
    assert page.input_value("#input") == "hello?" and page.locator(".message").count() == 0
    assert chat.sent[-1]["authorization"] is None
    page.wait_for_selector("#model:has-text('API key')")
    # the key is kept in localStorage: a reload still has it, and the model's name shows
    chat.settings(api_key=KEY)
    page.dispatch_event("#api-key", "change")
    page.wait_for_selector(f"#model:has-text('{server.model_name}')")
    page.reload()
    assert page.input_value("#api-key") == KEY
    page.wait_for_selector(f"#model:has-text('{server.model_name}')")
    assert chat.urls and all(u.startswith(server.url + "/") for u in chat.urls), chat.urls


def test_reply_streams_shows_tokens_per_second_and_each_turn_sends_the_conversation(server, chat):
    page = chat.page
    chat.settings(api_key=KEY, system="Be brief.", temperature="0.8", max_tokens=str(STREAMED))
    page.fill("#input", "Hello there")
    page.press("#input", "Enter")  # Enter sends
    lengths, live = set(), set()  # the reply's length and the rate shown, sampled until it is done
    deadline = time.monotonic() + 20
    while True:
        n, done, rate = chat.look()
        if done:
            break
        assert time.monotonic() < deadline, "the reply did not finish"
        if n:
            lengths.add(n)
            live.add(rate)
    final = len(chat.replies()[0])
    lengths.discard(final)
    assert final > 0 and lengths, "the reply appeared all at once: it did not stream"
    assert any(re.match(r"\d+\.\d tokens/s", r) for r in live), live  # the rate is shown as the reply streams
    assert chat.rate() > 0
    assert page.get_attribute("#rate", "data-tokens") == str(STREAMED)  # the usage the server reported
    assert "length" in page.text_content("#rate")  # the finish reason
    first = chat.replies()[0]

    # Shift+Enter is a new line, not a send; the settings are read again for each turn
    page.fill("#max-tokens", "20")
    page.fill("#input", "And then?")
    page.press("#input", "Shift+Enter")
    page.keyboard.type("Go on.")
    assert page.input_value("#input") == "And then?\nGo on." and len(chat.sent) == 1
    page.click("#send")
    chat.wait_done()
    assert page.locator(".message.user").count() == 2 and page.locator(".message.assistant").count() == 2
    assert chat.rate() > 0
    second = chat.sent[1]
    assert second["authorization"] == f"Bearer {KEY}"
    assert second["body"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": first},  # the reply exactly as shown
        {"role": "user", "content": "And then?\nGo on."},
    ]
    assert second["body"]["stream"] is True and second["body"]["temperature"] == 0.8
    assert second["body"]["max_tokens"] == 20
    assert server.wait_idle()["kv_blocks_used"] == 0


def aborted(server) -> float:
    """Requests the server ended because the client went away (finished_reason="abort" in /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        for sample in family.samples:
            if sample.name == "lmforge:request_success_total" and sample.labels.get("finished_reason") == "abort":
                return sample.value
    return 0.0


def test_stop_ends_the_reply_and_frees_the_engine(server, chat):
    page = chat.page
    before = aborted(server)
    chat.settings(api_key=KEY, max_tokens=str(LONG))
    page.fill("#input", "Tell me everything.")
    page.click("#send")
    page.wait_for_function(
        "() => document.querySelector('.message.assistant .content').textContent.length > 0", polling=10
    )
    assert page.is_disabled("#send") and page.is_enabled("#stop")
    assert server.engine.stats()["running"] == 1
    page.click("#stop")
    chat.wait_done()
    assert page.is_disabled("#stop") and page.is_enabled("#send")
    stopped = chat.last_reply_length()  # in UTF-16 units, as the page counts; Python counts code points
    stopped_text = chat.replies()[-1]
    assert "stopped" in page.text_content("#rate") and page.locator(".message.assistant .note").text_content() == (
        "stopped"
    )
    assert int(page.get_attribute("#rate", "data-tokens")) < LONG and chat.rate() > 0
    # the hang-up cancelled the request on the server: nothing runs and every KV block is back
    stats = server.wait_idle(timeout=5)
    assert stats["running"] == 0 and stats["waiting"] == 0 and stats["kv_blocks_used"] == 0
    assert aborted(server) == before + 1  # cancelled, not run to the end
    time.sleep(0.2)
    assert chat.last_reply_length() == stopped  # and the page shows no more of it
    # the conversation goes on from what was shown
    page.fill("#max-tokens", "4")
    page.fill("#input", "Short, please.")
    page.press("#input", "Enter")
    chat.wait_done()
    shown = chat.replies()[0]
    assert shown == stopped_text
    assert chat.sent[-1]["body"]["messages"][-2:] == [
        {"role": "assistant", "content": shown},
        {"role": "user", "content": "Short, please."},
    ]


def test_model_output_is_shown_as_text_never_as_markup(chat):
    """A reply (and a message) full of HTML is shown as typed; SSE events split across reads and CRLF line
    ends parse. The server's answer is replaced here: the tiny model cannot be made to write markup."""
    page = chat.page
    markup = '<img src=x onerror="window.pwned=1"><b>bold</b> & <script>window.pwned=2</script>'

    def event(delta: dict[str, Any], reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        return "data: " + json.dumps({"object": "chat.completion.chunk", "choices": [choice]}) + "\r\n\r\n"

    stream = event({"role": "assistant", "content": ""}) + event({"content": markup[:20]})
    stream += event({"content": markup[20:]}) + event({}, "stop") + "data: [DONE]\r\n\r\n"
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=stream),
    )
    page.fill("#input", "<i>hi</i>")
    page.press("#input", "Enter")
    chat.wait_done()
    assert page.text_content(".message.user .content") == "<i>hi</i>"
    assert chat.replies() == [markup]
    assert page.locator("#messages img, #messages b, #messages i, #messages script").count() == 0
    assert page.evaluate("() => window.pwned") is None
    assert "stop" in page.text_content("#rate")
