"""The rule table maps logical axes onto the mesh; a sharded model computes the same logits."""

import jax
import numpy as np
import pytest
from hf_reference import build_hf_model, hf_logits, left_padded_batch, max_diff_on_real
from jax.sharding import PartitionSpec as P

from minillm_jax import sharding
from minillm_jax.models import load_pretrained


def test_eight_fake_devices():
    assert len(jax.devices()) == 8


def test_make_mesh_fills_and_validates():
    assert dict(sharding.make_mesh(-1, 2, 2).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(sharding.make_mesh(1, -1, 4).shape) == {"data": 1, "fsdp": 2, "tensor": 4}
    with pytest.raises(ValueError, match="need 12 devices"):
        sharding.make_mesh(3, 2, 2)
    with pytest.raises(ValueError, match="at most one may be -1"):
        sharding.make_mesh(-1, -1, 2)


def test_rules_respect_divisibility_and_axis_reuse():
    mesh = sharding.make_mesh(2, 2, 2)
    rules = sharding.TRAIN_RULES
    assert sharding.logical_to_spec(("vocab", "embed"), (96, 32), mesh, rules) == P("tensor", "fsdp")
    # 3 kv heads cannot be split two ways: replicated, not an error.
    assert sharding.logical_to_spec(("embed", "kv_heads", "head_dim"), (32, 3, 8), mesh, rules) == P("fsdp", None, None)
    # Sampling keeps weights whole along fsdp.
    assert sharding.logical_to_spec(("vocab", "embed"), (96, 32), mesh, sharding.SAMPLE_RULES) == P("tensor", None)
    assert sharding.logical_to_spec(("batch", None), (8, 5), mesh, rules) == P(("data", "fsdp"), None)


@pytest.mark.parametrize("mesh_shape,rules", [((2, 2, 2), "TRAIN_RULES"), ((1, 2, 4), "TRAIN_RULES"),
                                              ((2, 1, 4), "SAMPLE_RULES")])
def test_sharded_model_matches_unsharded(tmp_path, mesh_shape, rules):
    hf_model = build_hf_model("llama_gqa")
    hf_model.save_pretrained(tmp_path)
    mesh = sharding.make_mesh(*mesh_shape)
    model = load_pretrained(tmp_path, mesh=mesh, rules=getattr(sharding, rules))
    specs = sharding.describe(model)
    assert "tensor" in specs["embed_tokens"][1] and "tensor" in specs["layers.q_proj"][1]
    assert model.layers["q_proj"][...].sharding.mesh.shape == mesh.shape
    ids, mask = left_padded_batch(96, batch=4)
    with jax.set_mesh(mesh):
        logits = jax.jit(lambda i, m: model(i, m))(ids, mask)
    assert max_diff_on_real(np.asarray(logits), hf_logits(hf_model, ids, mask), mask) <= 1e-4
