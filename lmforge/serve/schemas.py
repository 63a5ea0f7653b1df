"""The request bodies of the OpenAI-compatible API as pydantic models.

Unknown fields are refused (extra="forbid": a misspelt `max_token` must not be silently ignored; the app
answers 400 for them and 422 for a known field with a bad value). Fields follow the OpenAI API reference
and vLLM's extensions (top_k, min_p, repetition_penalty); a field OpenAI defines that lmforge cannot honour
(logit_bias, suffix, best_of > n) is accepted by the schema and refused by the handler with a clear message.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

MAX_LOGPROBS = 20  # OpenAI allows 5 for completions and 20 for chat; vLLM 20 for both
# Dividing fp32 logits by less overflows them to inf and the softmax to NaN (vLLM clamps to the same 0.01).
MIN_TEMPERATURE = 0.01
MIN_REPETITION_PENALTY = 0.01
INT64 = 2**63

NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]
TokenId = Annotated[int, Field(strict=True, ge=0, lt=2**31)]  # strict: no "1" or true for an id
Seed = Annotated[int, Field(ge=-INT64, lt=INT64)]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(Body):
    include_usage: bool | None = False


class Sampling(Body):
    """What completions and chat completions share: sampling, penalties, stop strings, n, streaming."""

    model: str | None = None
    temperature: Annotated[float, Field(ge=0, le=100)] | None = None  # None: 1, as OpenAI (0: greedy)
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=-1)] | None = None  # vLLM: -1 or 0 is off
    min_p: Annotated[float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[float, Field(ge=MIN_REPETITION_PENALTY, le=100)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] | None = None
    n: Annotated[int, Field(ge=1)] | None = None
    stop: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=16)] | None = None
    seed: Seed | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False  # vLLM's: generate max_tokens whatever the model says (benchmarks)
    logit_bias: dict[str, float] | None = None  # refused unless empty: the engine has no bias hook
    user: str | None = None  # accepted and ignored, as vLLM does

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, value: float | None) -> float | None:
        if value is not None and 0 < value < MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}")
        return value


Prompt = (
    str
    | Annotated[list[str], Field(min_length=1)]
    | Annotated[list[TokenId], Field(min_length=1)]
    | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
)


class CompletionRequest(Sampling):
    prompt: Prompt
    max_tokens: Annotated[int, Field(ge=0)] | None = None  # None: 16, as OpenAI; 0 only with echo
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool | None = False
    suffix: str | None = None  # refused unless empty: no infilling through this endpoint
    best_of: Annotated[int, Field(ge=1)] | None = None  # only best_of == n (no reranking)


class TextPart(Body):
    type: Literal["text"]
    text: str


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None


class JsonSchemaSpec(Body):
    name: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormatText(Body):
    type: Literal["text"]


class ResponseFormatJsonObject(Body):
    type: Literal["json_object"]


class ResponseFormatJsonSchema(Body):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[
    ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema, Field(discriminator="type")
]


class ChatCompletionRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None  # None: what the context leaves, up to the cap
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ResponseFormat | None = None


class TokenizeRequest(Body):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the model's chat format."""

    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[Message], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None  # None: True for a prompt, False for messages (the format adds them)
    add_generation_prompt: bool | None = True


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[TokenId]
