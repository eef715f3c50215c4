"""Write a model and its tokenizer as one GGUF file (llama.cpp's format), with the `gguf` package and numpy.

Architectures: `llama` (Llama, Mistral, SmolLM2), `qwen2` and `gpt2`. Weights leave in the HF layout
(`hf.iter_hf_tensors`), are renamed with the table `gguf.py` reads, and change layout where llama.cpp
wants it: Q/K rows of llama-arch models are permuted into interleaved rotary pairs (the inverse of
`gguf._unpermute`), GPT-2's Conv1D weights are transposed (its fused qkv stays fused). Types: `f32`,
`f16`, `bf16` and the block quantisations numpy can write (`q8_0`, `q5_0`, `q5_1`, `q4_0`, `q4_1`). As
llama.cpp's converter does, 1-D tensors and GPT-2's positions stay f32, and a matrix whose rows do not
divide into blocks falls back to f16; for 4- and 5-bit types the embedding and output matrices are q8_0
(llama.cpp's own Q4_1 SmolLM2 file does the same).

The file is written next to its destination under a temporary name, fsync'ed and renamed, one tensor
at a time, so a crash never leaves a torn file and memory stays near one tensor.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import secrets
import tempfile
from collections.abc import Callable

import numpy as np

from minillm_jax.models import gguf as gguf_io
from minillm_jax.models.config import ModelConfig, rope_inverse_frequencies
from minillm_jax.models.families import UnsupportedModelError
from minillm_jax.models.gguf_tokenizer import _LLAMA3_SPLIT, _QWEN2_SPLIT

__all__ = ["TYPES", "export_gguf", "export_gguf_from_hf", "export_gguf_from_workdir"]

TYPES = ("f32", "f16", "bf16", "q8_0", "q5_0", "q5_1", "q4_0", "q4_1")
_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}  # our model_type -> GGUF
_LOW_BIT = ("q5_0", "q5_1", "q4_0", "q4_1")

# HF name -> GGUF name: the inverse of the table gguf.py reads with
_LLAMA_GLOBAL = {hf: name for name, hf in gguf_io._GLOBAL_TENSORS.items()}
_LLAMA_LAYER = {hf: name for name, hf in gguf_io._LAYER_TENSORS.items()}
_GPT2_GLOBAL = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
                "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
                "lm_head.weight": "output.weight"}
_GPT2_LAYER = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
               "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
_LAYER_NAME = re.compile(r"(?:model\.layers|transformer\.h)\.(\d+)\.(.+)\.(weight|bias)")


def _qtypes():
    from gguf import GGMLQuantizationType as Q

    return {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0, "q5_0": Q.Q5_0, "q5_1": Q.Q5_1,
            "q4_0": Q.Q4_0, "q4_1": Q.Q4_1}


def _file_type(type: str) -> int:
    from gguf import LlamaFileType as F

    return {"f32": F.ALL_F32, "f16": F.MOSTLY_F16, "bf16": F.MOSTLY_BF16, "q8_0": F.MOSTLY_Q8_0,
            "q5_0": F.MOSTLY_Q5_0, "q5_1": F.MOSTLY_Q5_1, "q4_0": F.MOSTLY_Q4_0, "q4_1": F.MOSTLY_Q4_1}[type]


# ------------------------------------------------------------------------------------------- entry points


def export_gguf(model, tokenizer, output: str | os.PathLike, *, type: str = "f16", force: bool = False,
                name: str | None = None, tokenizer_pre: str | None = None) -> pathlib.Path:
    """Write `model` (our Transformer) and its transformers fast `tokenizer` to the GGUF file `output`.

    `type` is one of `TYPES`; an existing `output` is replaced only with `force`. `tokenizer_pre` overrides
    the llama.cpp pre-tokenizer name (`tokenizer.ggml.pre`) read off the tokenizer's pipeline.
    """
    from gguf import GGML_QUANT_VERSION

    if type not in TYPES:
        raise ValueError(f"GGUF type {type!r} is not supported; choose one of {', '.join(TYPES)}")
    output = pathlib.Path(output)
    if output.suffix != ".gguf":
        raise ValueError(f"{output}: the output file name should end in .gguf")
    if output.is_dir():
        raise IsADirectoryError(f"{output} is a directory; the output is one .gguf file")
    if output.exists() and not force:
        raise FileExistsError(f"{output} exists; pass force=True (--force) to replace it")
    if not output.parent.is_dir():
        raise FileNotFoundError(f"{output.parent}: the output directory does not exist")
    config = model.config
    arch = _architecture(config)
    vocab = _vocabulary(tokenizer, config, tokenizer_pre)
    plan = _tensor_plan(config, arch, type)

    # beside the output (so the rename is atomic), created by the writer with the usual file mode
    tmp = output.with_name(f".{output.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    try:
        writer = _writer_class()(tmp, arch)
        writer.add_name(name or f"minillm_jax {config.model_type}")
        writer.add_file_type(_file_type(type))
        if type not in ("f32", "f16", "bf16"):
            writer.add_quantization_version(GGML_QUANT_VERSION)
        _write_hparams(writer, config, arch)
        _write_vocabulary(writer, vocab)
        for entry in plan:
            writer.add_tensor_info(entry.name, entry.shape, np.dtype(np.float32), entry.nbytes, raw_dtype=entry.qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        _write_tensors(writer, model, plan)
        writer.flush()
        for file in writer.fout:
            os.fsync(file.fileno())
        writer.close()
        os.replace(tmp, output)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(output.parent)
    return output


def export_gguf_from_hf(source: str | os.PathLike, output: str | os.PathLike, *, type: str = "f16",
                        force: bool = False, **kwargs) -> pathlib.Path:
    """`export_gguf` of an HF directory (or hub name, or a `.gguf` file to re-type), loaded in float32."""
    from minillm_jax.models.hf import load_pretrained, load_tokenizer, resolve_path

    path = resolve_path(source)
    if path.is_dir() and not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise FileNotFoundError(f"{path}: no tokenizer.json or tokenizer_config.json; a GGUF file needs the tokenizer")
    if type not in TYPES:  # before the slow load
        raise ValueError(f"GGUF type {type!r} is not supported; choose one of {', '.join(TYPES)}")
    if pathlib.Path(output).exists() and not force:
        raise FileExistsError(f"{output} exists; pass force=True (--force) to replace it")
    model = load_pretrained(path, dtype="float32")
    return export_gguf(model, load_tokenizer(path), output, type=type, force=force, **kwargs)


def export_gguf_from_workdir(workdir: str | os.PathLike, step: int | None, output: str | os.PathLike, *,
                             type: str = "f16", force: bool = False, **kwargs) -> pathlib.Path:
    """`export_gguf` of a run's student at `step` (default: the best step, else the latest), through a
    temporary float32 HF export (`checkpoint.export_hf`), so the weights are exactly the checkpoint's."""
    from minillm_jax.checkpoint import export_hf, export_step

    if pathlib.Path(output).exists() and not force:
        raise FileExistsError(f"{output} exists; pass force=True (--force) to replace it")
    step = export_step(workdir, step)
    with tempfile.TemporaryDirectory(prefix="gguf-export-") as tmp:
        hf_dir = export_hf(workdir, pathlib.Path(tmp) / "hf", step=step, dtype="float32")
        return export_gguf_from_hf(hf_dir, output, type=type, force=force, **kwargs)


def _writer_class():
    from gguf import GGUFValueType, GGUFWriter

    class Writer(GGUFWriter):
        """gguf's writer, also writing empty typed arrays: llama.cpp requires tokenizer.ggml.merges for a
        byte-level vocabulary even when it has no merges (the byte tokenizer of `models/tiny.py`)."""

        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer


def _fsync_dir(directory: pathlib.Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------- architecture


def _architecture(c: ModelConfig) -> str:
    """The GGUF architecture for `c`, after checking that llama.cpp's graph for it computes our model."""
    arch = _ARCHS.get(c.model_type)
    if arch is None:
        raise UnsupportedModelError(f"GGUF export: model_type {c.model_type!r} has no llama.cpp architecture here; "
                                    f"supported: {', '.join(sorted(_ARCHS))}")
    wanted = dict(norm="rmsnorm", activation="silu", gated_mlp=True, positions="rope", pre_norm=True, final_norm=True)
    if arch == "gpt2":
        wanted = dict(norm="layernorm", activation="gelu_tanh", gated_mlp=False, positions="learned", pre_norm=True,
                      final_norm=True, qkv_bias=True, out_bias=True, mlp_bias=True, num_kv_heads=c.num_heads,
                      head_dim=c.hidden_size // c.num_heads)
    for field, value in wanted.items():
        if getattr(c, field) != value:
            raise UnsupportedModelError(f"GGUF export ({arch}): ModelConfig.{field}={getattr(c, field)!r}, "
                                        f"llama.cpp's {arch} graph needs {value!r}")
    if c.embed_dim not in (None, c.hidden_size) or c.position_offset:
        raise UnsupportedModelError(f"GGUF export ({arch}): projected embeddings / position offsets are OPT-only")
    windows = {w for w in c.sliding_windows if w and w < c.max_position_embeddings}
    if windows:
        raise UnsupportedModelError(f"GGUF export ({arch}): sliding-window attention ({sorted(windows)}) is not "
                                    "written (llama.cpp's llama/qwen2 graphs attend to the whole context)")
    kind = dict(c.rope_scaling).get("rope_type", "default")
    if kind == "llama3" and arch != "llama":
        raise UnsupportedModelError(f"GGUF export ({arch}): llama3 rope scaling is only read for llama")
    return arch


def _write_hparams(writer, c: ModelConfig, arch: str) -> None:
    from gguf import RopeScalingType

    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_heads)
    writer.add_head_count_kv(c.num_kv_heads)
    writer.add_vocab_size(c.vocab_size)
    if arch == "gpt2":
        writer.add_layer_norm_eps(c.norm_eps)
        return
    writer.add_layer_norm_rms_eps(c.norm_eps)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_rope_dimension_count(c.head_dim)
    if c.head_dim * c.num_heads != c.hidden_size:
        writer.add_key_length(c.head_dim)
        writer.add_value_length(c.head_dim)
    scaling = dict(c.rope_scaling)
    if scaling.get("rope_type") == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))


# ------------------------------------------------------------------------------------------- tensors


@dataclasses.dataclass(frozen=True)
class _Entry:
    name: str  # GGUF tensor name
    shape: tuple[int, ...]  # numpy order (the writer reverses it for the file)
    qtype: object  # GGMLQuantizationType
    hf_name: str | None  # the HF tensor it comes from (None: made here, see `make`)
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    make: Callable[[], np.ndarray] | None = None

    @property
    def nbytes(self) -> int:
        from gguf import GGML_QUANT_SIZES

        block, size = GGML_QUANT_SIZES[self.qtype]
        return int(np.prod(self.shape)) // block * size


def _tensor_plan(c: ModelConfig, arch: str, type: str) -> list[_Entry]:
    from minillm_jax.models import families

    qtypes = _qtypes()
    plan = []
    for spec in families.tensor_specs(c):
        name, transform = _gguf_name(spec.hf_name, arch, c)
        shape = tuple(spec.hf_shape[::-1]) if transform is np.transpose else spec.hf_shape
        plan.append(_Entry(name, shape, _tensor_qtype(name, shape, type, qtypes), spec.hf_name, transform))
    if dict(c.rope_scaling).get("rope_type") == "llama3":
        # llama.cpp divides each rotary frequency by rope_freqs[i] (convert_hf_to_gguf's llama3 factors)
        plain = rope_inverse_frequencies(c.replace(rope_scaling=()))
        divisors = (plain / rope_inverse_frequencies(c)).astype(np.float32)
        plan.append(_Entry("rope_freqs.weight", divisors.shape, qtypes["f32"], None, make=lambda: divisors))
    return plan


def _gguf_name(hf_name: str, arch: str, c: ModelConfig) -> tuple[str, Callable | None]:
    if arch == "gpt2":
        if hf_name in _GPT2_GLOBAL:
            return _GPT2_GLOBAL[hf_name], None
        layer, part, kind = _LAYER_NAME.fullmatch(hf_name).groups()
        # Conv1D [in, out] -> [out, in], the nn.Linear layout llama.cpp multiplies by
        return f"blk.{layer}.{_GPT2_LAYER[part]}.{kind}", (np.transpose if kind == "weight" else None)
    if hf_name in _LLAMA_GLOBAL:
        return _LLAMA_GLOBAL[hf_name], None
    layer, part, kind = _LAYER_NAME.fullmatch(hf_name).groups()
    name = f"blk.{layer}.{_LLAMA_LAYER[part]}.{kind}"
    if arch == "llama" and part in ("self_attn.q_proj", "self_attn.k_proj"):
        return name, _permute(c.num_heads if part == "self_attn.q_proj" else c.num_kv_heads)
    return name, None


def _permute(n_head: int) -> Callable[[np.ndarray], np.ndarray]:
    """HF's rotate-half rows per head (2, head_dim/2) -> llama.cpp's interleaved pairs (head_dim/2, 2)."""

    def apply(w: np.ndarray) -> np.ndarray:
        rest = w.shape[1:]
        return np.ascontiguousarray(w.reshape(n_head, 2, -1, *rest).swapaxes(1, 2).reshape(w.shape))

    return apply


def _tensor_qtype(name: str, shape: tuple[int, ...], type: str, qtypes: dict):
    from gguf import GGML_QUANT_SIZES

    if len(shape) < 2 or name == "position_embd.weight":
        return qtypes["f32"]
    if type in _LOW_BIT and name in ("token_embd.weight", "output.weight"):
        type = "q8_0"
    qtype = qtypes[type]
    if shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        return qtypes["f16"]  # rows do not divide into blocks
    return qtype


def _write_tensors(writer, model, plan: list[_Entry]) -> None:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    from minillm_jax.models.hf import iter_hf_tensors

    hf_tensors = iter_hf_tensors(model)
    for entry in plan:
        if entry.make is not None:
            array = entry.make()
        else:
            hf_name, array = next(hf_tensors)
            assert hf_name == entry.hf_name, (hf_name, entry.hf_name)
            if entry.transform is not None:
                array = entry.transform(array)
        array = np.ascontiguousarray(array, dtype=np.float32)
        assert array.shape == entry.shape, (entry.name, array.shape, entry.shape)
        if entry.qtype == Q.F32:
            data = array
        elif entry.qtype == Q.F16:
            data = array.astype(np.float16)
        else:
            data = quantize(array, entry.qtype)
        writer.write_tensor_data(data)


# ------------------------------------------------------------------------------------------- tokenizer


@dataclasses.dataclass
class _Vocabulary:
    model: str  # tokenizer.ggml.model: gpt2 (byte-level BPE) or llama (SentencePiece-style BPE)
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None
    special_ids: dict[str, int]  # bos, eos, unk, padding
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool | None
    chat_template: str | list | None


def _vocabulary(tokenizer, c: ModelConfig, pre_override: str | None) -> _Vocabulary:
    from gguf import TokenType

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedModelError(f"GGUF export: the tokenizer ({type(tokenizer).__name__}) is not a fast "
                                    "(tokenizers-backed) tokenizer")
    data = json.loads(backend.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise UnsupportedModelError(f"GGUF export: tokenizer model {model.get('type')!r} is not supported "
                                    "(only BPE: byte-level or SentencePiece-style with byte fallback)")
    spm = bool(model.get("byte_fallback"))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]

    by_id = {index: token for token, index in backend.get_vocab(with_added_tokens=True).items()}
    if by_id and max(by_id) >= c.vocab_size:
        raise UnsupportedModelError(f"GGUF export: the tokenizer has ids up to {max(by_id)} but the model's "
                                    f"vocab_size is {c.vocab_size}")
    added = {index: token for index, token in tokenizer.added_tokens_decoder.items()}
    unk_id = tokenizer.unk_token_id
    tokens, types = [], []
    for index in range(c.vocab_size):
        token = by_id.get(index)
        if token is None:  # padded vocabulary rows, named as convert_hf_to_gguf does
            tokens.append(f"[PAD{index}]")
            types.append(TokenType.USER_DEFINED)
        elif index in added:
            tokens.append(token)  # added tokens are stored as raw text, not in the byte-level spelling
            types.append(TokenType.CONTROL if added[index].special else TokenType.USER_DEFINED)
        elif spm and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            tokens.append(token)
            types.append(TokenType.BYTE)
        else:
            tokens.append(token)
            types.append(TokenType.UNKNOWN if index == unk_id else TokenType.NORMAL)

    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": unk_id,
           "padding": tokenizer.pad_token_id}
    for key, fallback in (("bos", c.bos_token_id), ("eos", c.eos_token_id), ("padding", c.pad_token_id)):
        if ids[key] is None and fallback is not None:
            ids[key] = fallback[0] if isinstance(fallback, tuple) else fallback
    if ids["bos"] is None and ids["eos"] is not None and not spm:
        ids["bos"] = ids["eos"]  # GPT-2's convention; llama.cpp would otherwise take id 11 as BOS
    add_bos, add_eos = _added_specials(tokenizer)

    if spm:
        pre, space_prefix, scores = "default", _spm_space_prefix(data), _spm_scores(tokens, types, merges)
    else:
        pre, space_prefix, scores = pre_override or _pre_tokenizer_name(data, merges), None, None
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = [{"name": key, "template": value} for key, value in template.items()]
    return _Vocabulary(model="llama" if spm else "gpt2", pre=pre_override or pre, tokens=tokens,
                       types=[int(t) for t in types], merges=merges, scores=scores,
                       special_ids={k: int(v) for k, v in ids.items() if v is not None}, add_bos=add_bos,
                       add_eos=add_eos, add_space_prefix=space_prefix, chat_template=template)


def _added_specials(tokenizer) -> tuple[bool, bool]:
    """Whether encoding puts BOS in front / EOS at the end (read off the tokenizer's behaviour)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos and full[1:1 + len(plain)] == plain
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos and full[-1 - len(plain):-1] == plain
    return add_bos, add_eos


def _pre_tokenizer_name(data: dict, merges: list[str]) -> str:
    """llama.cpp's name for a byte-level tokenizer's pre-tokenizer pipeline (`tokenizer.ggml.pre`)."""
    pre = data.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [part.get("type") for part in parts]
    if kinds == ["ByteLevel"] and (parts[0].get("use_regex", True) or not merges):
        return "gpt-2"  # without merges every byte is a token, so the split does not matter
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        if regex == _QWEN2_SPLIT:
            return "qwen2"
        if regex == _LLAMA3_SPLIT:
            return "llama-bpe"
    raise UnsupportedModelError(
        f"GGUF export: no llama.cpp pre-tokenizer is known for this tokenizer's pipeline "
        f"({json.dumps(pre)[:200]}); pass tokenizer_pre= with the name llama.cpp should use")


def _spm_space_prefix(data: dict) -> bool:
    """Whether a SentencePiece-style tokenizer prepends '▁' to the text (Metaspace or a Prepend normalizer)."""
    pre = data.get("pre_tokenizer") or {}
    metas = [p for p in (pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre])
             if p.get("type") == "Metaspace"]
    if metas:
        return metas[0].get("prepend_scheme", "always") != "never"
    normalizer = json.dumps(data.get("normalizer") or {})
    return '"Prepend"' in normalizer


def _spm_scores(tokens: list[str], types: list[int], merges: list[str]) -> list[float]:
    """Scores that make llama.cpp's SentencePiece merge order the BPE merge order: a piece scores minus the
    rank of the first merge that makes it; pieces no merge makes score below every merge."""
    rank = {}
    for index, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", ""), index)
    floor = -float(len(merges) + 1)
    return [0.0 if kind != 1 or len(token) == 1 else -float(rank[token]) if token in rank else floor
            for token, kind in zip(tokens, types)]


def _write_vocabulary(writer, v: _Vocabulary) -> None:
    writer.add_tokenizer_model(v.model)
    writer.add_tokenizer_pre(v.pre)
    writer.add_token_list(v.tokens)
    writer.add_token_types(v.types)
    if v.scores is not None:
        writer.add_token_scores(v.scores)
    if v.merges:
        writer.add_token_merges(v.merges)
    elif v.model == "gpt2":
        from gguf import GGUFValueType

        writer.add_key_value("tokenizer.ggml.merges", [], GGUFValueType.ARRAY, sub_type=GGUFValueType.STRING)
    for key, index in v.special_ids.items():
        writer.add_uint32(f"tokenizer.ggml.{key}_token_id" if key != "unk" else "tokenizer.ggml.unknown_token_id",
                          index)
    writer.add_add_bos_token(v.add_bos)
    writer.add_add_eos_token(v.add_eos)
    if v.add_space_prefix is not None:
        writer.add_add_space_prefix(v.add_space_prefix)
    if v.chat_template:
        writer.add_chat_template(v.chat_template)
