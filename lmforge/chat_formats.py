"""The chat formats lmforge knows natively, and jinja chat-template rendering as transformers does it.

Each format is rendered twice over: by a small Python function (so a bare tokenizer.json works without
jinja2) and by a jinja template written into tokenizer_config.json (so transformers and other tools render
the same string). The two must agree byte for byte; the byte-exact strings are in REFERENCE.md section 3.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from lmforge.errors import LmforgeError, suggest

Message = dict[str, str]

LLAMA3_DEFAULT_DATE = "26 Jul 2024"
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
GLM4_ROLES = ("system", "user", "assistant", "observation")


@dataclass(frozen=True)
class ChatFormat:
    """A chat format: its special tokens (in vocab order), the named ones, and how to render a conversation."""

    name: str
    special_tokens: tuple[str, ...]
    bos: str | None
    eos: str
    pad: str | None
    stop: tuple[str, ...]  # end-of-turn / stop tokens, eos included
    prefix: tuple[str, ...]  # what encode(add_special_tokens=True) puts in front of the text
    render: Callable[..., str]
    template: str  # jinja source that renders exactly what `render` does


# --- Native renderers --------------------------------------------------------------------------------


def _llama_turns(messages: list[Message], add_generation_prompt: bool) -> str:
    turns = "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages
    )
    return turns + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")


def _render_llama3(messages: list[Message], add_generation_prompt: bool, **_: Any) -> str:
    return "<|begin_of_text|>" + _llama_turns(messages, add_generation_prompt)


def _render_llama31(
    messages: list[Message], add_generation_prompt: bool, date_string: Any = LLAMA3_DEFAULT_DATE, **_: Any
) -> str:
    # Llama 3.1/3.2 always open with a system block carrying the knowledge cutoff and the date; only the
    # user's system text is stripped, not that header.
    system = ""
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    body = f"Cutting Knowledge Date: December 2023\nToday Date: {date_string}\n\n{system.strip()}"
    head = f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{body}<|eot_id|>"
    return head + _llama_turns(messages, add_generation_prompt)


def _render_chatml(messages: list[Message], add_generation_prompt: bool, **_: Any) -> str:
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": QWEN_DEFAULT_SYSTEM}, *messages]
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return turns + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _render_glm4(messages: list[Message], add_generation_prompt: bool, **_: Any) -> str:
    for m in messages:
        if m["role"] not in GLM4_ROLES:  # the same message as the template's raise_exception
            raise LmforgeError(f"glm4 chat format has no role {m['role']}; use one of {', '.join(GLM4_ROLES)}")
    turns = "".join(f"<|{m['role']}|>\n{m['content']}" for m in messages)
    return "[gMASK]<sop>" + turns + ("<|assistant|>" if add_generation_prompt else "")


# --- The same formats as jinja templates (our own; `\n` inside jinja string literals is a newline). -----

_LLAMA3_LOOP = """
{%- for message in loop_messages -%}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + (message['content'] | trim) + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
{%- endif -%}
"""

LLAMA3_TEMPLATE = (
    """{{- '<|begin_of_text|>' -}}
{%- set loop_messages = messages -%}"""
    + _LLAMA3_LOOP
)

LLAMA31_TEMPLATE = (
    """{{- '<|begin_of_text|>' -}}
{%- if date_string is not defined -%}
{%- set date_string = '"""
    + LLAMA3_DEFAULT_DATE
    + """' -%}
{%- endif -%}
{%- if messages[0]['role'] == 'system' -%}
{%- set system_message = messages[0]['content'] | trim -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set system_message = '' -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' -}}
{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' ~ date_string ~ '\\n\\n' -}}
{{- system_message + '<|eot_id|>' -}}"""
    + _LLAMA3_LOOP
)

CHATML_TEMPLATE = (
    """{%- if messages[0]['role'] != 'system' -%}
{{- '<|im_start|>system\\n"""
    + QWEN_DEFAULT_SYSTEM
    + """<|im_end|>\\n' -}}
{%- endif -%}
{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\\n' -}}
{%- endif -%}
"""
)

GLM4_TEMPLATE = (
    """{{- '[gMASK]<sop>' -}}
{%- for message in messages -%}
{%- if message['role'] not in """
    + json.dumps(list(GLM4_ROLES))
    + """ -%}
{{- raise_exception('glm4 chat format has no role ' ~ message['role'] ~ '; use one of """
    + ", ".join(GLM4_ROLES)
    + """') -}}
{%- endif -%}
{{- '<|' + message['role'] + '|>\\n' + message['content'] -}}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|assistant|>' -}}
{%- endif -%}
"""
)

_LLAMA3_SPECIALS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
)
_LLAMA3_STOP = ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")

FORMATS: dict[str, ChatFormat] = {
    f.name: f
    for f in (
        ChatFormat(
            "llama3",
            _LLAMA3_SPECIALS,
            "<|begin_of_text|>",
            "<|end_of_text|>",
            None,
            _LLAMA3_STOP,
            ("<|begin_of_text|>",),
            _render_llama3,
            LLAMA3_TEMPLATE,
        ),
        ChatFormat(
            "llama3.1",
            _LLAMA3_SPECIALS,
            "<|begin_of_text|>",
            "<|end_of_text|>",
            None,
            _LLAMA3_STOP,
            ("<|begin_of_text|>",),
            _render_llama31,
            LLAMA31_TEMPLATE,
        ),
        ChatFormat(
            "chatml",
            ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
            None,
            "<|endoftext|>",
            "<|endoftext|>",
            ("<|endoftext|>", "<|im_end|>"),
            (),
            _render_chatml,
            CHATML_TEMPLATE,
        ),
        ChatFormat(
            "glm4",
            (
                "<|endoftext|>",
                "[MASK]",
                "[gMASK]",
                "[sMASK]",
                "<sop>",
                "<eop>",
                "<|system|>",
                "<|user|>",
                "<|assistant|>",
                "<|observation|>",
            ),
            None,
            "<|endoftext|>",
            "<|endoftext|>",
            ("<|endoftext|>", "<|user|>", "<|observation|>"),
            ("[gMASK]", "<sop>"),  # what the GLM-4 tokenizers put in front of every sequence
            _render_glm4,
            GLM4_TEMPLATE,
        ),
    )
}


def get_format(name: str) -> ChatFormat:
    """The ChatFormat called `name`, or an LmforgeError listing the known ones."""
    if name not in FORMATS:
        raise LmforgeError(
            f"unknown chat format {name!r}; use one of {', '.join(FORMATS)}.{suggest(str(name), FORMATS)}"
        )
    return FORMATS[name]


# The special tokens that identify each format's tokenizers. Llama 3.0's tokenizer has no <|eom_id|> (a
# reserved token takes its id, 128008; 3.1 named it), so the Llama 3 family is known by the tokens both have.
_IDENTIFYING = {
    "glm4": FORMATS["glm4"].special_tokens,
    "chatml": FORMATS["chatml"].special_tokens,
    "llama3": ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
}


def detect_format(tokens: set[str]) -> str | None:
    """The native format whose identifying special tokens are all in `tokens` (llama3 for the Llama 3 family:
    nothing in the tokens says 3.1, whose format adds a dated system block)."""
    for name in ("glm4", "chatml", "llama3"):  # glm4's and chatml's token sets both contain <|endoftext|>
        if set(_IDENTIFYING[name]) <= tokens:
            return name
    return None


def validate_messages(messages: Any) -> list[Message]:
    """Check that `messages` is a non-empty list of {'role': str, 'content': str} dicts; return it as a list."""
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes) or not messages:
        got = "an empty list" if isinstance(messages, list | tuple) else f"a {type(messages).__name__}"
        raise LmforgeError(f"messages must be a non-empty list of {{'role': str, 'content': str}} dicts, got {got}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise LmforgeError(f"message {i} is a {type(m).__name__}; write it as {{'role': str, 'content': str}}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                got = "is missing" if key not in m else f"is a {type(m[key]).__name__}"
                raise LmforgeError(f"message {i}: {key!r} {got}; every message needs a str 'role' and 'content'")
    return [dict(m) for m in messages]


# --- Jinja rendering, configured like transformers' chat-template environment. ---------------------------


def render_template(
    template: str,
    messages: list[Message],
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str],
    template_kwargs: Mapping[str, Any],
) -> str:
    """Render a chat template the way transformers' `apply_chat_template(..., tokenize=False)` does."""
    compiled = _compile(template)  # first: it explains a missing jinja2
    import jinja2

    variables: dict[str, Any] = {"tools": None, "documents": None, **special_tokens, **template_kwargs}
    try:
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
        raise LmforgeError(f"the chat template failed: {e}") from e


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> Any:
    # jinja2 is only needed for templates, so it is imported here rather than at module load.
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise LmforgeError(
            "rendering a chat template needs jinja2: `pip install jinja2` (or the extra: `pip install lmforge[chat]`)."
        ) from e

    class GenerationBlock(jinja2.ext.Extension):
        # Some templates mark assistant text with {% generation %}...{% endgeneration %}; render the body as is.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
        # Unlike jinja's own tojson, no HTML escaping: templates emit JSON for the model, not for a browser.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise LmforgeError(
            f"the chat template is not valid jinja (line {e.lineno}: {e.message}); fix or remove it"
        ) from e
