"""Byte-level BPE tokenizers: train, load and save HF tokenizer directories, chat formats, streaming decode.

The work is done by the HF `tokenizers` library (Rust); this module adds the conventions lmforge relies on:
special tokens at the end of the vocab, the chat formats of Llama 3, Qwen 2.5 (ChatML) and GLM-4, stop ids,
UTF-8-safe streaming, and bytes per token for bits-per-byte.

Special-token strings inside raw text (e.g. "<|eot_id|>" typed by a user) ARE parsed as special tokens by
`encode`, as `transformers`' `tokenizer(text, add_special_tokens=False)` does by default; this is what makes
a rendered chat template tokenize to its control tokens. Sanitize untrusted text before encoding if that
matters to you.
"""

from __future__ import annotations

import codecs
import json
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _RustTokenizer

from lmforge.chat_formats import FORMATS, ChatFormat, detect_format, get_format, render_template, validate_messages
from lmforge.errors import LmforgeError, warn

# The Llama 3 / GPT-4 pre-tokenizer split (GLM-4 uses the same one): contractions, letter runs with one
# leading non-letter, digits in groups of 1-3, punctuation runs (with trailing newlines), newline runs, and
# whitespace that leaves one space to prefix the next word. Bytes are mapped to printable characters after
# the split (ByteLevel without its own regex).
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen 2.5 (chatml) splits digits one by one and NFC-normalizes first. transformers rebuilds exactly this
# pipeline (Qwen2Tokenizer) for any directory whose config.json says qwen2, whatever tokenizer.json holds,
# so a chatml tokenizer must use it to give the same ids there.
QWEN_SPLIT_PATTERN = SPLIT_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
# The files of an HF tokenizer directory (transformers' fast and slow formats, chat templates in their own
# files): what travels with the weights whenever lmforge copies a checkpoint.
_TOKENIZER_FILE_PREFIXES = ("tokenizer", "special_tokens_map", "chat_template", "added_tokens", "vocab.", "merges.")


def tokenizer_files(directory: str | Path) -> list[Path]:
    """The tokenizer files in `directory` (tokenizer.json, tokenizer_config.json, chat_template.jinja, ...)."""
    root = Path(directory)
    if not root.is_dir():
        return []
    return sorted(f for f in root.iterdir() if f.is_file() and f.name.startswith(_TOKENIZER_FILE_PREFIXES))


_NAMED = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _byte_to_char() -> dict[int, str]:
    # GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves, the other 68 bytes are
    # shifted to code points 256.. so that every byte has a visible, non-whitespace character.
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


_CHAR_TO_BYTE = {c: b for b, c in _byte_to_char().items()}


def _token_to_bytes(token: str) -> bytes:
    # Mirrors the ByteLevel decoder: a token made only of byte characters stands for those bytes; anything
    # else (an added token whose text has a space or a non-Latin character) stands for its own UTF-8 text.
    try:
        return bytes(_CHAR_TO_BYTE[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


class StreamDecoder:
    """Turns token ids into text one at a time without ever emitting a broken multi-byte character.

    `push(id)` returns the newly completed text (possibly ""); `flush()` returns what is left at the end.
    The pieces concatenate to exactly `Tokenizer.decode(ids)`: bytes of an unfinished character wait for the
    next token, and invalid bytes become U+FFFD just as in `decode`.
    """

    def __init__(self, piece_bytes: list[bytes]) -> None:
        self._pieces = piece_bytes
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        # An id outside the vocabulary (a model's padded embedding rows) adds nothing, as in `decode`.
        piece = self._pieces[token_id] if 0 <= token_id < len(self._pieces) else b""
        return self._utf8.decode(piece)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class Tokenizer:
    """A byte-level BPE tokenizer with a chat format. Build one with `train` or `from_pretrained`.

    Attributes: `vocab_size` (one past the largest id, specials included), `bos_token_id`, `eos_token_id`,
    `pad_token_id` (None when absent), `stop_token_ids` (eos plus the chat format's end-of-turn tokens),
    `chat_format` ("llama3", "llama3.1", "chatml", "glm4" or None) and `special_token_ids`.
    """

    def __init__(
        self,
        backend: _RustTokenizer,
        *,
        chat_format: str | None = None,
        chat_template: str | None = None,
        named_tokens: dict[str, str | None] | None = None,
    ) -> None:
        """Wrap a `tokenizers.Tokenizer`. `named_tokens` maps bos_token/eos_token/pad_token/... to token
        strings; those not given come from the chat format."""
        self._tk = backend
        self._tk.no_truncation()  # some tokenizer.json files carry truncation/padding: ids must not depend on it
        self._tk.no_padding()
        self.chat_format = chat_format
        self.chat_template = chat_template  # jinja source; when set it wins over the native format
        self._named = self._resolve_named(named_tokens or {})  # bos_token/eos_token/... -> token string
        added = self._tk.get_added_tokens_decoder()
        self.special_token_ids: set[int] = {i for i, t in added.items() if t.special}
        vocab = self._tk.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(len(vocab), max(vocab.values(), default=-1) + 1)
        self.bos_token_id: int | None = self._named_id("bos_token")
        self.eos_token_id: int | None = self._named_id("eos_token")
        self.pad_token_id: int | None = self._named_id("pad_token")
        self._piece_bytes: list[bytes] | None = None

    @property
    def backend(self) -> _RustTokenizer:
        """The wrapped `tokenizers.Tokenizer`, for readers of its vocabulary and merges (GGUF export); changing
        it bypasses this class."""
        return self._tk

    @property
    def chat_format(self) -> str | None:
        """The native chat format ("llama3", "llama3.1", "chatml", "glm4") or None; may be set."""
        return self._chat_format

    @chat_format.setter
    def chat_format(self, name: str | None) -> None:
        self._chat_format = get_format(name).name if name is not None else None

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end generation: eos, then the chat format's end-of-turn tokens (no duplicates)."""
        names = [self._named.get("eos_token")]
        if self.chat_format:
            names += FORMATS[self.chat_format].stop
        ids = [self._tk.token_to_id(n) for n in names if n is not None]
        return list(dict.fromkeys(i for i in ids if i is not None))

    # --- construction -------------------------------------------------------------------------------

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int,
        chat_format: str = "llama3",
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> Tokenizer:
        """Train a byte-level BPE on `texts`. The vocab is the 256 byte tokens, then merges in training order,
        then the chat format's special tokens, `vocab_size` in all."""
        fmt = get_format(chat_format)
        _check_train_args(texts, vocab_size, fmt, min_frequency)
        n_trained = vocab_size - len(fmt.special_tokens)
        tk = _new_byte_level_bpe(fmt)
        trainer = trainers.BpeTrainer(
            vocab_size=n_trained,
            min_frequency=min_frequency,
            show_progress=show_progress,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is a token: any text round-trips
            special_tokens=[],  # added after training so they take the last ids
        )
        tk.train_from_iterator(texts, trainer)
        if tk.get_vocab_size() < n_trained:
            raise LmforgeError(
                f"the training text only supports {tk.get_vocab_size()} BPE tokens at min_frequency={min_frequency}, "
                f"but vocab_size={vocab_size} needs {n_trained} (+{len(fmt.special_tokens)} special); pass "
                f"vocab_size<={tk.get_vocab_size() + len(fmt.special_tokens)}, more text, or a lower min_frequency"
            )
        tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in fmt.special_tokens])
        tk.post_processor = _post_processor(tk, fmt)
        return cls(tk, chat_format=fmt.name)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load an HF tokenizer directory: tokenizer.json, plus tokenizer_config.json (special tokens, chat
        template), special_tokens_map.json and chat_template.jinja when present; or a GGUF file's vocabulary."""
        root = Path(path)
        if root.suffix.lower() == ".gguf" and root.is_file():  # llama.cpp's file embeds its vocabulary
            from lmforge.checkpoint.gguf_read import load_gguf_tokenizer

            return load_gguf_tokenizer(root)
        if not root.is_dir():
            hint = " (pass the directory that holds it)" if root.name == "tokenizer.json" else ""
            raise LmforgeError(
                f"tokenizer directory {str(path)!r} does not exist{hint}; pass a directory with tokenizer.json"
            )
        if not (root / "tokenizer.json").is_file():
            raise LmforgeError(
                f"{root} has no tokenizer.json; lmforge reads HF fast-tokenizer files. Convert a sentencepiece or "
                "tiktoken tokenizer with transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir)"
            )
        try:
            backend = _RustTokenizer.from_file(str(root / "tokenizer.json"))
        except Exception as e:  # the Rust library raises a bare Exception for any parse error
            raise LmforgeError(
                f"{root / 'tokenizer.json'} is not a valid tokenizer file ({e}); re-save or re-download it"
            ) from e
        config = _read_json(root / "tokenizer_config.json")
        _add_config_tokens(backend, config)
        named = _named_from_config(config, _read_json(root / "special_tokens_map.json"))
        template = _chat_template(root, config)
        fmt = config.get("lmforge_chat_format")
        if fmt is not None and fmt not in FORMATS:
            raise LmforgeError(
                f"{root / 'tokenizer_config.json'}: unknown lmforge_chat_format {fmt!r}; "
                f"use one of {', '.join(FORMATS)}"
            )
        if fmt is None:
            fmt = detect_format(set(backend.get_vocab(with_added_tokens=True)))
            if fmt is not None and template is None:  # the guess decides how conversations are rendered: say so
                warn(
                    f"{root}: no chat template or lmforge_chat_format in tokenizer_config.json; using the {fmt} "
                    "chat format, inferred from the special tokens (set tokenizer.chat_format if that is wrong)."
                )
        return cls(backend, chat_format=fmt, chat_template=template, named_tokens=named)

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `path` (created if
        needed); transformers' AutoTokenizer loads the directory with the same ids, decoding and chat output."""
        root = Path(path)
        root.mkdir(parents=True, exist_ok=True)
        self._tk.save(str(root / "tokenizer.json"))
        named = dict(self._named)
        added = self._tk.get_added_tokens_decoder()
        config: dict[str, Any] = {
            # The generic class: a model-specific one (e.g. Qwen2Tokenizer) would rebuild the pipeline itself.
            "tokenizer_class": "PreTrainedTokenizerFast",
            "added_tokens_decoder": {str(i): _added_token_dict(t) for i, t in sorted(added.items())},
            **named,
            "clean_up_tokenization_spaces": False,  # decoding must give back the exact text
        }
        template = self.chat_template or (FORMATS[self.chat_format].template if self.chat_format else None)
        if template is not None:
            config["chat_template"] = template
        if self.chat_format is not None:
            config["lmforge_chat_format"] = self.chat_format
        _write_json(root / "tokenizer_config.json", config)
        by_content = {t.content: t for t in added.values()}
        special_map = {
            k: _added_token_dict(by_content[v], with_special=False) for k, v in named.items() if v in by_content
        }
        _write_json(root / "special_tokens_map.json", special_map)

    # --- encoding and decoding ----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special-token strings in the text become their special ids (see module doc);
        `add_special_tokens` adds the format's prefix (BOS for Llama 3, [gMASK]<sop> for GLM-4, none for ChatML)."""
        if not isinstance(text, str):
            raise LmforgeError(f"encode takes a str, got {type(text).__name__}; use encode_batch for a list")
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        """`encode` for many texts at once, in parallel threads (same ids as one by one)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise LmforgeError("encode_batch takes a list of str")
        return [e.ids for e in self._tk.encode_batch_fast(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; invalid UTF-8 (from an arbitrary id sequence) decodes to U+FFFD."""
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A decoder for ids that arrive one at a time (see StreamDecoder)."""
        pieces = self._pieces()
        if skip_special_tokens:
            pieces = [b"" if i in self.special_token_ids else p for i, p in enumerate(pieces)]
        return StreamDecoder(pieces)

    def token_bytes(self) -> np.ndarray:
        """int32 [vocab_size]: the UTF-8 bytes each token adds to decoded text, 0 for special tokens. Summed
        over the ids of ordinary text it gives len(decode(ids).encode()), the denominator of bits per byte."""
        out = np.array([len(p) for p in self._pieces()], dtype=np.int32)
        out[list(self.special_token_ids)] = 0
        return out

    def get_vocab(self) -> dict[str, int]:
        """Token string -> id for the whole vocabulary, added tokens included."""
        return self._tk.get_vocab(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tk.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tk.id_to_token(int(i))

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, chat_format={self.chat_format!r})"

    # --- chat ---------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        **template_kwargs: Any,
    ) -> list[int] | str:
        """Render a conversation ([{'role': str, 'content': str}, ...]) and, if `tokenize`, return its ids.

        A jinja `chat_template` from tokenizer_config.json is rendered as transformers does (extra keyword
        arguments become template variables, e.g. date_string for llama3.1); otherwise the native format.
        The ids are encode(rendered text), special tokens parsed and none added.
        """
        messages = validate_messages(messages)
        if self.chat_template is not None:
            text = render_template(self.chat_template, messages, add_generation_prompt, self._named, template_kwargs)
        elif self.chat_format is not None:
            text = FORMATS[self.chat_format].render(messages, add_generation_prompt, **template_kwargs)
        else:
            raise LmforgeError(
                "this tokenizer has no chat template and no known chat format; add a 'chat_template' to its "
                "tokenizer_config.json, or set tokenizer.chat_format to one of " + ", ".join(FORMATS)
            )
        return self.encode(text) if tokenize else text

    # --- internals ----------------------------------------------------------------------------------

    def _resolve_named(self, given: dict[str, str | None]) -> dict[str, str]:
        # Values from the config win (an explicit null too, as Qwen's bos_token); the chat format fills gaps.
        fmt = FORMATS[self.chat_format] if self.chat_format else None
        defaults = {"bos_token": fmt.bos, "eos_token": fmt.eos, "pad_token": fmt.pad} if fmt else {}
        return {k: v for k, v in {**defaults, **given}.items() if v is not None}

    def _named_id(self, key: str) -> int | None:
        token = self._named.get(key)
        if token is None:
            return None
        i = self._tk.token_to_id(token)
        if i is None:
            warnings.warn(f"{key} {token!r} is not in the vocabulary; treating it as absent", stacklevel=3)
        return i

    def piece_bytes(self) -> list[bytes]:
        """The bytes each id decodes to (special tokens: their text), computed once: the basis of streaming,
        token_bytes, OpenAI logprob token strings and grammar masks. Byte-level BPE tokenizers only."""
        return self._pieces()

    def _pieces(self) -> list[bytes]:
        if self._piece_bytes is None:
            if not isinstance(self._tk.decoder, decoders.ByteLevel):
                raise LmforgeError(
                    f"streaming decode and token_bytes need a byte-level BPE tokenizer (Llama 3, Qwen 2.5, GLM-4); "
                    f"this one's decoder is {type(self._tk.decoder).__name__}"
                )
            tokens = [self._tk.id_to_token(i) for i in range(self.vocab_size)]
            self._piece_bytes = [b"" if t is None else _token_to_bytes(t) for t in tokens]
        return self._piece_bytes


# --- helpers ------------------------------------------------------------------------------------------


def _new_byte_level_bpe(fmt: ChatFormat) -> _RustTokenizer:
    tk = _RustTokenizer(models.BPE())
    qwen = fmt.name == "chatml"
    if qwen:
        tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN if qwen else SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    return tk


def _check_train_args(texts: Iterable[str], vocab_size: int, fmt: ChatFormat, min_frequency: int) -> None:
    if isinstance(texts, str | bytes):
        raise LmforgeError("train takes an iterable of texts (e.g. a list of str), not a single str")
    minimum = 256 + len(fmt.special_tokens)
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise LmforgeError(
            f"vocab_size={vocab_size} is too small: the 256 byte tokens and the {len(fmt.special_tokens)} special "
            f"tokens of {fmt.name} need {minimum}; pass vocab_size>={minimum}"
        )
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise LmforgeError(f"min_frequency={min_frequency} must be an int >= 1")


def _post_processor(tk: _RustTokenizer, fmt: ChatFormat) -> processors.TemplateProcessing:
    # What add_special_tokens=True adds; written into tokenizer.json so transformers adds the same.
    head = list(fmt.prefix)
    return processors.TemplateProcessing(
        single=" ".join([*head, "$A"]),
        pair=" ".join([*head, "$A", *(f"{t}:1" for t in head), "$B:1"]),
        special_tokens=[(t, tk.token_to_id(t)) for t in head],
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LmforgeError(f"{path} is not valid JSON ({e}); fix or delete it") from e
    if not isinstance(data, dict):
        raise LmforgeError(f"{path} should hold a JSON object, found {type(data).__name__}; fix or delete it")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json writes special tokens either as strings or as AddedToken dicts.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _named_from_config(config: dict[str, Any], special_map: dict[str, Any]) -> dict[str, str | None]:
    # Like transformers: special_tokens_map.json is only a fallback for what tokenizer_config.json lacks.
    source = {**special_map, **config}
    return {k: _token_content(source[k]) for k in _NAMED if k in source}


def _add_config_tokens(backend: _RustTokenizer, config: dict[str, Any]) -> None:
    # transformers adds tokens that tokenizer_config.json declares but tokenizer.json lacks; so do we.
    declared = config.get("added_tokens_decoder") or {}
    vocab = backend.get_vocab(with_added_tokens=True)
    for idx, entry in sorted(declared.items(), key=lambda kv: int(kv[0])):
        content = _token_content(entry)
        if content is None or content in vocab:
            continue
        fields = {k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in entry}
        backend.add_tokens([AddedToken(content, **fields)])
        if backend.token_to_id(content) != int(idx):
            raise LmforgeError(
                f"tokenizer_config.json puts {content!r} at id {idx}, but tokenizer.json gives it "
                f"{backend.token_to_id(content)}; re-save the tokenizer with transformers"
            )


def _chat_template(root: Path, config: dict[str, Any]) -> str | None:
    # transformers >= 4.43 may write the template to chat_template.jinja, which wins over the config entry.
    jinja_file = root / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise LmforgeError(
                f"{root / 'tokenizer_config.json'} has chat templates {sorted(map(str, named))} but none named "
                "'default'; name the one to use 'default'"
            )
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise LmforgeError(f"{root / 'tokenizer_config.json'}: chat_template should be a string")
    return template


def _added_token_dict(token: AddedToken, with_special: bool = True) -> dict[str, Any]:
    out = {
        "content": token.content,
        "lstrip": token.lstrip,
        "normalized": token.normalized,
        "rstrip": token.rstrip,
        "single_word": token.single_word,
    }
    if with_special:
        out["special"] = token.special
    return out
