"""The fast tokenizer a GGUF file describes (vocabulary, merges, specials, chat template), built with
the `tokenizers` library so that neither torch nor transformers' GGUF loader is needed."""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from minillm_jax.models.gguf import _CONTROL, _NORMAL, _UNKNOWN, _USER_DEFINED, GGUFError, _File

if TYPE_CHECKING:
    import transformers

logger = logging.getLogger(__name__)

_GPT2_DEFAULT_PRES = {None, "default", "gpt-2", "gpt2"}
_DIGIT_SPLIT_PRES = {"smollm", "starcoder"}  # GPT-2 regex after isolating every digit
_LLAMA3_PRES = {"llama3", "llama-bpe", "llama-v3", "smaug-bpe", "falcon3"}
_QWEN2_PRES = {"qwen2", "deepseek-r1-qwen"}

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def load_gguf_tokenizer(
    path: str | os.PathLike, *, match_original_tokenizer: bool = True
) -> "transformers.PreTrainedTokenizerFast":
    """The fast tokenizer the GGUF file describes: vocabulary, merges, specials and chat template.

    By default the pre-tokenizer is the model's original tokenizer.json pipeline (what it was trained
    on): digits isolated for tokenizer.ggml.pre "smollm"/"starcoder" (as llama.cpp also does), NFC for
    "qwen2", ignore_merges for Llama 3. `match_original_tokenizer=False` gives the pipeline that
    transformers' own GGUF loader builds instead (`AutoTokenizer.from_pretrained(..., gguf_file=...)`).
    The two differ only on rare inputs (e.g. SmolLM2 on "a  2": whitespace before a digit).
    """
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    g = _File(path)
    model = g.get("tokenizer.ggml.model")
    tokens = g.get("tokenizer.ggml.tokens")
    types = g.get("tokenizer.ggml.token_type", None)
    if types is not None and len(types) != len(tokens):
        raise GGUFError(
            f"{g.path}: tokenizer.ggml.token_type has {len(types)} entries "
            f"but tokenizer.ggml.tokens has {len(tokens)}"
        )
    types = types or [_NORMAL] * len(tokens)

    if model == "gpt2":
        backend, keepable = _byte_level_backend(g, tokens, match_original_tokenizer)
        add_bos_default = False
    elif model == "llama":
        backend, keepable = _sentencepiece_backend(g, tokens, types)
        add_bos_default = True  # llama.cpp adds BOS for SentencePiece vocabularies that do not say
    else:
        raise GGUFError(
            f"{g.path}: unsupported tokenizer model {model!r} (tokenizer.ggml.model); supported: gpt2, llama"
        )

    # control tokens must stay whole and count as special; user-defined ones stay whole only
    added = [
        AddedToken(token, special=kind != _USER_DEFINED, normalized=False)
        for token, kind in zip(tokens, types)
        if kind in (_CONTROL, _UNKNOWN, _USER_DEFINED) and keepable(token)
    ]
    backend.add_tokens(added)

    specials = {}
    for role, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = g.get_int(f"tokenizer.ggml.{key}_token_id", None)
        if token_id is None:
            continue
        if not 0 <= token_id < len(tokens):
            raise GGUFError(f"{g.path}: tokenizer.ggml.{key}_token_id={token_id} is outside the vocabulary")
        specials[f"{role}_token"] = tokens[token_id]

    kwargs = dict(
        tokenizer_object=backend,
        add_bos_token=bool(g.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        add_eos_token=bool(g.get("tokenizer.ggml.add_eos_token", False)),
        clean_up_tokenization_spaces=False,
        **specials,
    )
    chat_template = _chat_template(g)
    if chat_template is not None:
        kwargs["chat_template"] = chat_template
    arch = g.get("general.architecture", None)
    if arch is not None and f"{arch}.context_length" in g.reader.fields:
        kwargs["model_max_length"] = g.get_int(f"{arch}.context_length")
    return PreTrainedTokenizerFast(**kwargs)


def _chat_template(g: _File) -> str | dict | None:
    default = g.get("tokenizer.chat_template", None)
    prefix = "tokenizer.chat_template."
    named = {key[len(prefix):]: g.get(key) for key in g.reader.fields if key.startswith(prefix)}
    if not named:
        return default
    if default is not None:
        named["default"] = default
    return named


def _byte_level_backend(g: _File, tokens: list[str], original: bool):
    """Byte-level BPE (GPT-2 style) with the pre-tokenizer `tokenizer.ggml.pre` names."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers

    spelling = _byte_spelling()
    alphabet = set(spelling.values())
    vocab = {}
    for index, token in enumerate(tokens):
        # added tokens are stored as raw text; the BPE model wants the byte-level spelling
        key = token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(key, index)
    merges = _merges(g)

    pre = g.get("tokenizer.ggml.pre", None)
    backend = Tokenizer(
        _bpe(
            g,
            vocab=vocab,
            merges=merges,
            dropout=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            ignore_merges=original and pre in _LLAMA3_PRES,  # Llama 3's tokenizer.json looks words up whole first
        )
    )
    if pre in _LLAMA3_PRES or pre in _QWEN2_PRES:
        split = _LLAMA3_SPLIT if pre in _LLAMA3_PRES else _QWEN2_SPLIT
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        if original and pre in _QWEN2_PRES:
            backend.normalizer = normalizers.NFC()  # as in Qwen2's tokenizer.json
    elif original and pre in _DIGIT_SPLIT_PRES:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    else:
        if pre not in _GPT2_DEFAULT_PRES | _DIGIT_SPLIT_PRES:
            logger.warning("%s: unknown tokenizer.ggml.pre %r; using the GPT-2 pre-tokenizer", g.path, pre)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # a raw-text token outside the byte alphabet is not in the vocab as spelled, so adding it would mint a new id
    return backend, lambda token: set(token) <= alphabet


def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> printable character table: printable Latin-1 bytes as themselves, the rest from U+0100."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _bpe(g: _File, **kwargs):
    from tokenizers import models

    try:
        return models.BPE(**kwargs)
    except Exception as err:  # e.g. a merge naming a token that is not in the vocabulary
        raise GGUFError(f"{g.path}: inconsistent tokenizer.ggml.tokens / tokenizer.ggml.merges: {err}") from err


def _merges(g: _File) -> list[tuple[str, str]]:
    merges = []
    for index, merge in enumerate(g.get("tokenizer.ggml.merges", [])):
        pair = merge.split(" ")
        if len(pair) != 2:
            raise GGUFError(f"{g.path}: tokenizer.ggml.merges[{index}] = {merge!r} is not two tokens")
        merges.append((pair[0], pair[1]))
    return merges


def _sentencepiece_backend(g: _File, tokens: list[str], types: list[int]):
    """SentencePiece-style BPE with byte fallback (llama.cpp's "llama" tokenizer model)."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers

    vocab = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    if "tokenizer.ggml.merges" in g.reader.fields:
        merges = _merges(g)
    else:
        scores = g.get("tokenizer.ggml.scores")
        if len(scores) != len(tokens):
            raise GGUFError(
                f"{g.path}: tokenizer.ggml.scores has {len(scores)} entries "
                f"but tokenizer.ggml.tokens has {len(tokens)}"
            )
        merges = _merges_from_scores(tokens, scores, types)

    unk_id = g.get_int("tokenizer.ggml.unknown_token_id", None)
    backend = Tokenizer(
        _bpe(
            g,
            vocab=vocab,
            merges=merges,
            unk_token=tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None,
            fuse_unk=True,
            byte_fallback=True,
            dropout=None,
        )
    )
    prefix_space = bool(g.get("tokenizer.ggml.add_space_prefix", True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix_space else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    return backend, lambda token: token in vocab


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: a piece's splits, best-scored piece first."""
    normal = {}
    for index, (token, kind) in enumerate(zip(tokens, types)):
        if kind in (_NORMAL, _USER_DEFINED):
            normal.setdefault(token, index)
    found = []
    for token, index in normal.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                found.append((-scores[index], index, normal[left], normal[right], left, right))
    found.sort()
    return [(left, right) for *_, left, right in found]
