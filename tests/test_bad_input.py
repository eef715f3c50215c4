"""Bad checkpoints fail with errors that name the file and the tensor or field."""

import json

import numpy as np
import pytest
from hf_reference import build_hf_model
from safetensors.numpy import load_file, save_file

from minillm_jax.models import CheckpointError, UnsupportedModelError, load_pretrained


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "llama"
    build_hf_model("llama_gqa").save_pretrained(path)
    return path


def _copy_with(checkpoint, dest, edit):
    dest.mkdir()
    (dest / "config.json").write_text((checkpoint / "config.json").read_text())
    tensors = load_file(checkpoint / "model.safetensors")
    edit(tensors)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


def test_missing_config_json(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"config\.json is missing") as info:
        load_pretrained(tmp_path)
    assert str(tmp_path) in str(info.value)


def test_nonexistent_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")


def test_missing_tensor_is_named(checkpoint, tmp_path):
    name = "model.layers.1.self_attn.k_proj.weight"
    bad = _copy_with(checkpoint, tmp_path / "bad", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")) as info:
        load_pretrained(bad)
    assert "missing" in str(info.value) and str(bad) in str(info.value)


def test_wrong_shape_is_named(checkpoint, tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"

    def shrink(tensors):
        tensors[name] = tensors[name][:-1]

    bad = _copy_with(checkpoint, tmp_path / "bad", shrink)
    with pytest.raises(CheckpointError) as info:
        load_pretrained(bad)
    message = str(info.value)
    assert name in message and "model.safetensors" in message and "(63, 32)" in message and "(64, 32)" in message


def test_unexpected_tensor_is_named(checkpoint, tmp_path):
    bad = _copy_with(checkpoint, tmp_path / "bad", lambda t: t.update(extra=np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match="unexpected tensors.*'extra'"):
        load_pretrained(bad)


def test_unsupported_model_type_is_named(checkpoint, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    config = json.loads((checkpoint / "config.json").read_text())
    config["model_type"] = "bert"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match=r"model_type 'bert' is not supported.*gpt2, opt, llama"):
        load_pretrained(bad)


def test_truncated_safetensors(checkpoint, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((checkpoint / "config.json").read_text())
    data = (checkpoint / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_pretrained(bad)


def test_missing_shard_listed_in_index(checkpoint, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((checkpoint / "config.json").read_text())
    (bad / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="model-00001-of-00002.safetensors"):
        load_pretrained(bad)


def test_invalid_config_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        load_pretrained(tmp_path)


def test_truncated_gguf_is_named(smollm2_gguf, tmp_path):
    from minillm_jax.models.gguf import GGUFError

    bad = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as f:
        bad.write_bytes(f.read(1 << 20))
    with pytest.raises(GGUFError, match="cut.gguf"):
        load_pretrained(bad)
