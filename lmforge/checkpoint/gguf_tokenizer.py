"""lmforge's byte-level BPE tokenizers <-> a GGUF file's vocabulary (llama.cpp's "gpt2" tokenizer model).

A GGUF holds the tokens (in the byte-level alphabet, as tokenizer.json spells them), one type per token
(NORMAL, CONTROL for special tokens, USER_DEFINED for other added tokens, UNUSED for padding rows), the
merges as "a b" strings, the special ids, the add-BOS flag and the chat template. How text is split before
BPE is not stored as a regex but as the name of one of llama.cpp's pre-tokenizers (`tokenizer.ggml.pre`).
llama.cpp would otherwise guess that name from a hash of token ids, and a self-trained vocabulary has an
unknown hash; so the name is chosen here from the tokenizer's own split regex.
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as RustTokenizer

from lmforge.chat_formats import FORMATS, detect_format
from lmforge.checkpoint.gguf_names import import_gguf
from lmforge.errors import LmforgeError
from lmforge.tokenizer import QWEN_SPLIT_PATTERN, SPLIT_PATTERN, Tokenizer

_GPT2 = "gpt2"  # ByteLevel's built-in split (GPT-2's regex), llama.cpp's pre type of the same name
# The split regex -> llama.cpp's pre-tokenizer with that regex (llama-vocab.cpp); GLM-4's pre type "glm4"
# uses Llama 3's regex and, like GLM-4's tokenizer, no BOS.
_PRE_FOR_REGEX = {SPLIT_PATTERN: "llama-bpe", QWEN_SPLIT_PATTERN: "qwen2", _GPT2: "gpt2"}
# ... and back: the pre types whose regex lmforge rebuilds exactly.
_REGEX_FOR_PRE = {
    **dict.fromkeys(("llama-bpe", "llama3", "llama-v3", "glm4", "chatglm-bpe", "dbrx", "smaug-bpe"), SPLIT_PATTERN),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), QWEN_SPLIT_PATTERN),
    "gpt2": _GPT2,
}
# The end-of-turn token llama.cpp stops on for each chat format (its converters' choices).
_EOT = {"llama3": "<|eot_id|>", "llama3.1": "<|eot_id|>", "chatml": "<|im_end|>", "glm4": "<|user|>"}
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5  # gguf.TokenType


# --- writing -----------------------------------------------------------------------------------------
def _split_regex(spec: dict[str, Any]) -> str | None:
    """The regex a byte-level tokenizer.json splits text with (or _GPT2 for ByteLevel's own), else None."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    splits = [s.get("pattern", {}).get("Regex") for s in steps if s.get("type") == "Split"]
    byte_level = [s for s in steps if s.get("type") == "ByteLevel"]
    if len(byte_level) != 1 or len(steps) != len(splits) + 1:
        return None
    if not splits:
        return _GPT2 if byte_level[0].get("use_regex", True) else None
    return splits[0] if len(splits) == 1 and not byte_level[0].get("use_regex", True) else None


def write_tokenizer(writer: Any, tokenizer: Tokenizer, vocab_size: int, family: str) -> None:
    """The tokenizer.* keys for `tokenizer`, its token list padded to the model's `vocab_size` rows."""
    spec = json.loads(tokenizer.backend.to_str())
    if spec.get("model", {}).get("type") != "BPE" or not isinstance(tokenizer.backend.decoder, decoders.ByteLevel):
        raise LmforgeError("GGUF export embeds byte-level BPE tokenizers only (Llama 3, Qwen 2.5, GLM-4 style).")
    regex = _split_regex(spec)
    if regex not in _PRE_FOR_REGEX:
        raise LmforgeError(
            "the tokenizer splits text with a pre-tokenizer llama.cpp has no name for; GGUF export knows the "
            "Llama 3 / GLM-4 split (llama-bpe, glm4), Qwen 2's (qwen2) and GPT-2's (gpt2)."
        )
    pre = "glm4" if family == "glm4" and regex == SPLIT_PATTERN else _PRE_FOR_REGEX[regex]
    if tokenizer.vocab_size > vocab_size:
        raise LmforgeError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding only {vocab_size} rows; "
            "they do not belong together."
        )
    # Ids without a token (the model's padding rows) get llama.cpp's placeholder names, typed UNUSED.
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [_UNUSED] * vocab_size
    added = tokenizer.backend.get_added_tokens_decoder()
    for token, i in tokenizer.get_vocab().items():
        tokens[i] = token
        types[i] = (_CONTROL if added[i].special else _USER_DEFINED) if i in added else _NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    eot = tokenizer.token_to_id(_EOT[tokenizer.chat_format]) if tokenizer.chat_format else None
    for add, token_id in (
        (writer.add_bos_token_id, tokenizer.bos_token_id),
        (writer.add_eos_token_id, tokenizer.eos_token_id),
        (writer.add_eot_token_id, eot),
        (writer.add_pad_token_id, tokenizer.pad_token_id),
    ):
        if token_id is not None:
            add(token_id)
    # What encode(add_special_tokens=True) puts in front: llama.cpp can only say "BOS or nothing".
    prefix = tokenizer.backend.encode("", add_special_tokens=True).ids
    writer.add_add_bos_token(tokenizer.bos_token_id is not None and prefix == [tokenizer.bos_token_id])
    writer.add_add_eos_token(False)
    template = tokenizer.chat_template or (FORMATS[tokenizer.chat_format].template if tokenizer.chat_format else None)
    if template is not None:
        writer.add_chat_template(template)


# --- reading -----------------------------------------------------------------------------------------
def tokenizer_from_gguf(meta: dict[str, Any], source: str) -> Tokenizer | None:
    """The tokenizer a GGUF file's metadata describes, or None when it has no vocabulary."""
    K = import_gguf().Keys.Tokenizer
    kind = meta.get(K.MODEL)
    if kind in (None, "none", "no_vocab"):
        return None
    if kind != "gpt2":
        raise LmforgeError(
            f"{source}: tokenizer model {kind!r} is not supported; lmforge rebuilds byte-level BPE ('gpt2') "
            "vocabularies (Llama 3, Qwen 2.5, GLM-4), not sentencepiece ones."
        )
    pre = meta.get(K.PRE, "default")
    if pre not in _REGEX_FOR_PRE:
        raise LmforgeError(
            f"{source}: tokenizer.ggml.pre {pre!r} is not one lmforge rebuilds ({', '.join(sorted(_REGEX_FOR_PRE))})."
        )
    tokens: list[str] = meta[K.LIST]
    types: list[int] = meta.get(K.TOKEN_TYPE) or [_NORMAL] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens) or len(types) != len(tokens):
        raise LmforgeError(f"{source}: the token list has duplicate tokens or a type list of another length.")
    merges = [tuple(m.split(" ", 1)) for m in meta.get(K.MERGES, [])]
    # Every id stays in the BPE vocabulary (special and padding ones too), so ids are the file's.
    tk = RustTokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    regex = _REGEX_FOR_PRE[pre]
    if regex == _GPT2:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated")
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    if regex == QWEN_SPLIT_PATTERN:
        # Qwen's tokenizer NFC-normalizes first (tokenizer.py); llama.cpp and transformers' GGUF reader do
        # not, so the three differ on text that is not in NFC.
        tk.normalizer = normalizers.NFC()
    tk.decoder = decoders.ByteLevel()
    typed = list(zip(tokens, types, strict=True))
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in typed if k == _CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in typed if k == _USER_DEFINED])

    def token(key: str) -> str | None:
        i = meta.get(key)
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    named = {"bos_token": token(K.BOS_ID), "eos_token": token(K.EOS_ID), "pad_token": token(K.PAD_ID)}
    fmt = detect_format(set(vocab))
    head: list[str] = []
    if meta.get(K.ADD_BOS) and named["bos_token"] is not None:
        head = [named["bos_token"]]
    elif fmt == "glm4":  # GLM-4's tokenizer starts every sequence with [gMASK]<sop>, which no GGUF key says
        head = list(FORMATS["glm4"].prefix)
    tail = [named["eos_token"]] if meta.get(K.ADD_EOS) and named["eos_token"] is not None else []
    if head or tail:
        tk.post_processor = processors.TemplateProcessing(
            single=" ".join([*head, "$A", *tail]),
            pair=" ".join([*head, "$A", *tail, *(f"{t}:1" for t in head), "$B:1", *(f"{t}:1" for t in tail)]),
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys([*head, *tail])],
        )
    return Tokenizer(tk, chat_format=fmt, chat_template=meta.get(K.CHAT_TEMPLATE), named_tokens=named)
