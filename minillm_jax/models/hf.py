"""Hugging Face checkpoints in and out: config.json + safetensors (one file or sharded with an index),
GGUF files, tokenizers. No torch: tensors are read with `safetensors.numpy` one at a time and written
by a streaming safetensors writer, so neither direction holds a second copy of the model.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import struct
from typing import Any, Iterable, Iterator

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import safe_open

from minillm_jax import sharding as sharding_lib
from minillm_jax.models import families
from minillm_jax.models.config import ModelConfig
from minillm_jax.models.families import UnsupportedModelError
from minillm_jax.models.transformer import Transformer
from minillm_jax.workdir import atomic_directory, atomic_write_text

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
MAX_SHARD_BYTES = 5 * 1024**3
_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")
_SAFE_DTYPES = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16"}


class CheckpointError(ValueError):
    """A checkpoint on disk does not match what its config promises."""


# ------------------------------------------------------------------------------------------- loading


def load_pretrained(path: str | os.PathLike, *, dtype: str = "float32", mesh: jax.sharding.Mesh | None = None,
                    compute_dtype: str | None = None, real_vocab_size: int | None = None, remat: str = "none",
                    rules: sharding_lib.Rules = sharding_lib.SAMPLE_RULES) -> Transformer:
    """A Transformer from an HF directory, a hub name, or a `.gguf` file.

    Parameters are stored in `dtype` (compute in `compute_dtype`, default the same) and placed by the
    logical-axis `rules` on `mesh` when one is given. `real_vocab_size` defaults to the tokenizer's size
    when tokenizer files are present (padded vocabularies), else the checkpoint's vocab_size.
    """
    path = resolve_path(path)
    if path.suffix == ".gguf":
        source = _GGUFSource(path)  # one parse of the file's metadata, for the config and the weights
        hf_dict = source.tensors.config
        config = _config_from_dict(hf_dict, path)
        tokenizer_size = hf_dict["vocab_size"]
    else:
        config = _config_from_dict(_read_config_json(path), path / "config.json")
        source = _SafetensorsSource(path)
        tokenizer_size = tokenizer_vocab_size(path)
    real = real_vocab_size or tokenizer_size
    config = config.replace(param_dtype=dtype, dtype=compute_dtype or dtype, remat=remat,
                            real_vocab_size=min(real, config.vocab_size) if real else None)
    return _load_weights(config, source, mesh, rules)


def resolve_path(path: str | os.PathLike) -> pathlib.Path:
    """A local path as is; `org/name` that is not a local path is fetched from the HF hub."""
    local = pathlib.Path(path).expanduser()
    if local.exists():
        return local
    text = str(path)
    if text.count("/") == 1 and not text.startswith((".", "/")) and not text.endswith(".gguf"):
        from huggingface_hub import snapshot_download

        return pathlib.Path(snapshot_download(
            text, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]))
    raise FileNotFoundError(f"model path {str(path)!r} does not exist (expected an HF directory with "
                            "config.json, a .gguf file, or a hub name like 'org/model')")


def _read_config_json(directory: pathlib.Path) -> dict[str, Any]:
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: expected an HF checkpoint directory or a .gguf file")
    file = directory / "config.json"
    if not file.exists():
        raise FileNotFoundError(f"{file}: config.json is missing; an HF checkpoint directory needs one")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from e


def _config_from_dict(hf_dict: dict[str, Any], where: pathlib.Path) -> ModelConfig:
    model_type = hf_dict.get("model_type")
    if model_type not in families.SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{where}: model_type {model_type!r} is not supported; supported families: "
            f"{', '.join(families.SUPPORTED_MODEL_TYPES)}")
    from transformers import CONFIG_MAPPING

    try:
        hf_config = CONFIG_MAPPING[model_type].from_dict(dict(hf_dict))
    except Exception as e:  # transformers' own validation: surface it with the file name
        raise CheckpointError(f"{where}: transformers rejects this {model_type} config: {e}") from e
    return families.config_from_hf(hf_config)


def tokenizer_vocab_size(directory: pathlib.Path) -> int | None:
    """Highest token id + 1 from tokenizer.json (or vocab.json + added tokens), without loading it."""
    file = directory / "tokenizer.json"
    if file.exists():
        data = json.loads(file.read_text())
        vocab = data.get("model", {}).get("vocab") or {}
        ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]
        ids += [t["id"] for t in data.get("added_tokens", [])]
        return max(ids) + 1 if ids else None
    file = directory / "vocab.json"
    if file.exists():
        ids = list(json.loads(file.read_text()).values())
        added = directory / "added_tokens.json"
        if added.exists():
            ids += list(json.loads(added.read_text()).values())
        return max(ids) + 1 if ids else None
    return None


class _TensorSource:
    """Named float tensors in HF layout, read one at a time."""

    def names(self) -> set[str]:
        raise NotImplementedError

    def get(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def where(self, name: str | None = None) -> str:
        raise NotImplementedError


class _SafetensorsSource(_TensorSource):
    def __init__(self, directory: pathlib.Path):
        self.directory = directory
        index = directory / SAFE_INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: expected JSON with a 'weight_map' ({e})") from e
            self.file_of = {name: directory / file for name, file in weight_map.items()}
        elif (directory / SAFE_SINGLE).exists():
            file = directory / SAFE_SINGLE
            self.file_of = {name: file for name in _safetensors_keys(file)}
        else:
            raise FileNotFoundError(f"{directory}: no {SAFE_SINGLE} or {SAFE_INDEX} (only safetensors "
                                    "checkpoints are read; convert .bin files with transformers first)")
        for file in set(self.file_of.values()):
            if not file.exists():
                raise FileNotFoundError(f"{file}: listed in {index.name} but missing")

    def names(self) -> set[str]:
        return set(self.file_of)

    def get(self, name: str) -> np.ndarray:
        file = self.file_of[name]
        # Opened per tensor so its memory map is released at once: resident memory stays one tensor.
        try:
            with safe_open(file, framework="numpy") as f:
                return f.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{file}: cannot read tensor {name!r} ({e})") from e

    def where(self, name: str | None = None) -> str:
        if name in self.file_of:
            return str(self.file_of[name])
        files = sorted({f.name for f in self.file_of.values()})
        return f"{self.directory} ({', '.join(files)})"


def _safetensors_keys(file: pathlib.Path) -> list[str]:
    try:
        with safe_open(file, framework="numpy") as f:
            return list(f.keys())
    except Exception as e:
        raise CheckpointError(f"{file}: not a readable safetensors file ({e})") from e


class _GGUFSource(_TensorSource):
    def __init__(self, file: pathlib.Path):
        from minillm_jax.models import gguf

        self.file = file
        self.tensors = gguf.GGUFTensors(file)

    def names(self) -> set[str]:
        return set(self.tensors.names())

    def get(self, name: str) -> np.ndarray:
        return self.tensors.get(name)

    def where(self, name: str | None = None) -> str:
        return str(self.file)


def _resolve_names(specs, source: _TensorSource, config: ModelConfig) -> dict[str, str]:
    """Map each spec's canonical HF name to the name used in this checkpoint (base-model prefixes such as
    `transformer.` or `model.` may be absent in older exports); fail on missing or unexpected tensors."""
    available = source.names()
    resolved = {}
    for spec in specs:
        candidates = [spec.hf_name] + [spec.hf_name[len(p):] for p in ("transformer.", "model.")
                                       if spec.hf_name.startswith(p)]
        found = next((n for n in candidates if n in available), None)
        if found is None:
            raise CheckpointError(f"{source.where()}: tensor {spec.hf_name!r} is missing "
                                  f"(model_type {config.model_type}, {config.num_layers} layers)")
        resolved[spec.hf_name] = found
    unexpected = sorted(n for n in available - set(resolved.values())
                        if not n.endswith(_IGNORED_SUFFIXES)
                        and not (config.tie_word_embeddings and n.endswith("lm_head.weight")))
    if unexpected:
        raise CheckpointError(f"{source.where()}: unexpected tensors for a {config.model_type} model with this "
                              f"config: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    return resolved


def _load_weights(config: ModelConfig, source: _TensorSource, mesh, rules) -> Transformer:
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    variables = dict(nnx.to_flat_state(state))
    by_name = {".".join(map(str, path)): var for path, var in variables.items()}
    dtype = np.dtype(jnp.dtype(config.param_dtype))

    def target_sharding(name):
        if mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return sharding_lib.variable_sharding(by_name[name], mesh, rules)

    specs = families.tensor_specs(config)
    resolved = _resolve_names(specs, source, config)
    values: dict[str, jax.Array] = {}
    filled: dict[str, set] = {name: set() for name in by_name}
    for spec in specs:
        name = resolved[spec.hf_name]
        array = source.get(name)
        if tuple(array.shape) != spec.hf_shape:
            raise CheckpointError(f"{source.where(name)}: tensor {name!r} has shape {tuple(array.shape)}, "
                                  f"expected {spec.hf_shape} from the config")
        parts = spec.to_ours(np.asarray(array))
        del array
        for target, part in zip(spec.targets, parts):
            shape = by_name[target].get_value().shape
            part = np.asarray(part, dtype=dtype)
            if spec.layer is None:
                values[target] = sharding_lib.from_host(part, target_sharding(target))
            else:
                if target not in values:
                    values[target] = _allocate(shape, dtype, target_sharding(target))
                values[target] = _set_layer(values[target], part, np.int32(spec.layer))
            filled[target].add(spec.layer)
    for name, var in by_name.items():
        stacked = (var.get_metadata().get("out_sharding") or (None,))[0] == "layers"
        expected = set(range(config.num_layers)) if stacked else {None}
        if filled[name] != expected:
            raise CheckpointError(f"{source.where()}: parameter {name} was not filled completely "
                                  f"(layers {sorted(expected - filled[name], key=str)} missing)")
        var.set_value(values[name])
    return nnx.merge(graphdef, state)


def _allocate(shape, dtype, sharding) -> jax.Array:
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)()


@functools.lru_cache(maxsize=None)
def _layer_setter(sharding):
    def set_layer(stacked, part, layer):
        return jax.lax.dynamic_update_index_in_dim(stacked, part.astype(stacked.dtype), layer, 0)

    return jax.jit(set_layer, donate_argnums=0, out_shardings=sharding)


def _set_layer(stacked: jax.Array, part: np.ndarray, layer) -> jax.Array:
    """Write one layer in place (the stacked buffer is donated), keeping the stacked array's sharding."""
    return _layer_setter(stacked.sharding)(stacked, part, layer)


# ------------------------------------------------------------------------------------------- saving


def save_pretrained(model: Transformer, out_dir: str | os.PathLike, tokenizer=None, *,
                    dtype: str | None = None, max_shard_bytes: int = MAX_SHARD_BYTES, force: bool = False,
                    marker: dict[str, Any] | None = None) -> pathlib.Path:
    """Write an HF directory that `transformers.AutoModelForCausalLM.from_pretrained` loads with the same
    logits: config.json, safetensors (sharded with an index above `max_shard_bytes`),
    generation_config.json, and the tokenizer files when a tokenizer is given.

    The directory is written whole or not at all (filled beside `out_dir`, then renamed into place) and
    carries a marker file (`marker` adds to it); an `out_dir` that holds anything but an earlier export
    of ours is refused with FileExistsError, before any work, unless `force`."""
    config = model.config
    dtype = dtype or config.param_dtype
    np_dtype = np.dtype(jnp.dtype(dtype))
    params = {".".join(map(str, path)): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    entries = [(spec.hf_name, spec.hf_shape, np_dtype, _hf_producer(spec, params, np_dtype))
               for spec in families.tensor_specs(config)]
    with atomic_directory(out_dir, force=force, marker={"model_type": config.model_type, "dtype": dtype,
                                                        **(marker or {})}) as out:
        hf_dict = save_config(config, out, dtype=dtype)
        _write_sharded(out, entries, max_shard_bytes)
        generation = {k: v for k, v in dict(bos_token_id=hf_dict.get("bos_token_id"),
                                            eos_token_id=hf_dict.get("eos_token_id"),
                                            pad_token_id=hf_dict.get("pad_token_id")).items() if v is not None}
        _atomic_write(out / "generation_config.json",
                      json.dumps({"_from_model_config": True, **generation}, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
    return pathlib.Path(out_dir)


def save_config(config: ModelConfig, out_dir: str | os.PathLike, *, dtype: str | None = None) -> dict[str, Any]:
    """Write the HF config.json of `config` (validated by transformers' config class); returns its fields."""
    from transformers import CONFIG_MAPPING

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_dict = families.config_to_hf(config)
    hf_config = CONFIG_MAPPING[config.model_type](**{k: v for k, v in hf_dict.items() if k != "model_type"})
    hf_config.dtype = dtype or config.param_dtype
    _atomic_write(out / "config.json", hf_config.to_json_string(use_diff=True))
    return hf_dict


def _hf_producer(spec, params, np_dtype):
    def produce() -> np.ndarray:
        parts = []
        for target in spec.targets:
            value = params[target].get_value()
            if spec.layer is not None:
                value = value[spec.layer]
            parts.append(np.asarray(jax.device_get(value)).astype(np.float32))
        array = np.ascontiguousarray(spec.to_hf(*parts)).astype(np_dtype)
        assert array.shape == spec.hf_shape, (spec.hf_name, array.shape, spec.hf_shape)
        return array

    return produce


def _write_sharded(out: pathlib.Path, entries, max_shard_bytes: int) -> None:
    shards, current, size = [], [], 0
    for entry in entries:
        nbytes = int(np.prod(entry[1])) * entry[2].itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(entry)
        size += nbytes
    shards.append(current)
    for stale in list(out.glob("model*.safetensors")) + [out / SAFE_INDEX]:
        stale.unlink(missing_ok=True)
    if len(shards) == 1:
        write_safetensors(out / SAFE_SINGLE, shards[0])
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(out / file, shard)
        for name, shape, dtype, _ in shard:
            weight_map[name] = file
            total += int(np.prod(shape)) * dtype.itemsize
    _atomic_write(out / SAFE_INDEX, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                               indent=2))


def write_safetensors(file: pathlib.Path, entries: Iterable[tuple[str, tuple, np.dtype, Any]]) -> None:
    """Stream tensors into a safetensors file: header first (shapes are known), then each tensor's bytes
    as its producer makes them. Written to a temporary name and renamed, so a crash leaves no torn file."""
    entries = list(entries)
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype, _ in entries:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        header[name] = {"dtype": _SAFE_DTYPES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = file.with_name(file.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, produce in entries:
            array = produce()
            if array.shape != tuple(shape) or array.dtype != dtype:
                raise AssertionError(f"{name}: produced {array.shape} {array.dtype}, header says {shape} {dtype}")
            f.write(np.ascontiguousarray(array).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, file)


def _atomic_write(file: pathlib.Path, text: str) -> None:
    atomic_write_text(file, text)


# ------------------------------------------------------------------------------------------- tokenizers


def load_tokenizer(path: str | os.PathLike):
    """A transformers tokenizer for an HF directory / hub name, or one built from a `.gguf` file."""
    path = resolve_path(path)
    if path.suffix == ".gguf":
        from minillm_jax.models.gguf_tokenizer import load_gguf_tokenizer

        return load_gguf_tokenizer(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def iter_hf_tensors(model: Transformer) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) for every tensor `save_pretrained` would write."""
    params = {".".join(map(str, path)): var for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    for spec in families.tensor_specs(model.config):
        yield spec.hf_name, _hf_producer(spec, params, np.dtype(np.float32))()
