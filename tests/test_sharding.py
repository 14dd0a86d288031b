"""Meshes from config, the logical rule table, and the replication guard."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from gemma_jax import sharding


def mesh_of(data=1, fsdp=1, tensor=1):
  return sharding.make_mesh(dict(data=data, fsdp=fsdp, tensor=tensor))


@pytest.mark.parametrize("sizes,shape", [
    (dict(data=1, fsdp=-1, tensor=1), (1, 8, 1)),
    (dict(data=2, fsdp=-1, tensor=2), (2, 2, 2)),
    (dict(data=-1, fsdp=2, tensor=1), (4, 2, 1)),
    (dict(data=2, fsdp=4, tensor=1), (2, 4, 1)),
])
def test_mesh_fill(sizes, shape):
  mesh = sharding.make_mesh(sizes)
  assert tuple(mesh.shape.values()) == shape and mesh.axis_names == ("data", "fsdp", "tensor")


@pytest.mark.parametrize("sizes,message", [
    (dict(data=3, fsdp=1, tensor=1), r"mesh.data=3, mesh.fsdp=1, mesh.tensor=1: product 3 != 8"),
    (dict(data=3, fsdp=-1, tensor=1), "cannot fill 8 devices"),
    (dict(data=-1, fsdp=-1, tensor=1), "at most one -1"),
    (dict(data=0, fsdp=8, tensor=1), "sizes must be positive"),
])
def test_bad_mesh_names_the_keys(sizes, message):
  with pytest.raises(ValueError, match=message):
    sharding.make_mesh(sizes)


def test_multislice_mesh_multiplies_dcn_axes():
  devices = jax.devices()
  mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=1, dcn_data=2), devices)
  assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  # Emulated slices are consecutive device blocks: slice s holds devices 4s..4s+3.
  assert [d.id for d in mesh.devices[1].ravel()] == [4, 5, 6, 7]


def test_rules_map_logical_axes():
  mesh = mesh_of(data=2, fsdp=2, tensor=2)
  spec = lambda axes, shape: sharding.logical_to_spec(axes, shape, mesh)
  assert spec(("vocab", "embed"), (512, 64)) == P("tensor", "fsdp")
  assert spec(("layers", None, "embed", "mlp"), (4, 2, 64, 128)) == P(None, None, "fsdp", "tensor")
  assert spec(("batch", "length"), (8, 16)) == P(("data", "fsdp"), None)
  # One kv head (multi-query) cannot be split over tensor=2: replicated on that axis.
  assert spec(("layers", None, "kv_heads", "embed", "head_dim"), (2, 2, 1, 64, 16)) == \
      P(None, None, None, "fsdp", None)
  with pytest.raises(ValueError, match="logical axis 'bogus' has no rule"):
    spec(("bogus",), (4,))


def test_replication_guard():
  mesh = mesh_of(fsdp=8)
  params = {"w": jax.ShapeDtypeStruct((64, 64), np.float32),
            "norm": jax.ShapeDtypeStruct((64,), np.float32)}
  shardings = {"w": sharding.named_sharding(mesh, ("embed", None), (64, 64)),
               "norm": sharding.replicated(mesh)}
  report = sharding.check_replication(params, shardings, max_fraction=0.05)
  assert report["replicated_param_bytes"] == 64 * 4
  assert report["replicated_fraction"] == pytest.approx(64 / (64 * 65))
  with pytest.raises(ValueError, match="sharding.max_replicated_fraction=0.001"):
    sharding.check_replication(params, shardings, max_fraction=0.001)
