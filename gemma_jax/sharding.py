"""Meshes and THE logical-axis rule table: how every parameter and batch lands on devices.

Physical mesh axes are `data`, `fsdp` and `tensor`. On a multi-slice pod each axis is the
product of its ICI (within a slice) and DCN (across slices) parts, built with
`mesh_utils.create_hybrid_device_mesh`, so the rule table never needs to know about slices.

ZeRO-3 is the rule `embed -> fsdp`: every parameter with an embedding dimension (all of them
but the norms) is split over the fsdp axis, and gradients and optimizer state take the same
shardings (`tree_shardings_like`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes. The one table for every model, parameter and activation.
LOGICAL_RULES: dict[str, tuple[str, ...]] = {
    # parameters
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "mlp": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "head_dim": (),
    "layers": (),
    # LoRA adapters (gemma_jax.lora): the rank dimension is small and kept whole; a factor
    # without an embed dimension shards its other dimensions over fsdp as well (ZeRO-3).
    "lora_rank": (),
    "lora_mlp": ("tensor", "fsdp"),
    "lora_heads": ("tensor", "fsdp"),
    "lora_kv_heads": ("tensor", "fsdp"),
    "lora_head_dim": ("fsdp",),
    # activations
    "batch": ("data", "fsdp"),
    "length": (),
    "cache_length": (),
    "act_embed": (),
    "act_vocab": ("tensor",),
}


def mesh_shape(sizes: Mapping[str, int], num_devices: int, what: str = "mesh") -> tuple[int, ...]:
  """Resolve one -1 entry to fill `num_devices`; sizes are given for data, fsdp, tensor."""
  shape = [int(sizes[a]) for a in MESH_AXES]
  desc = ", ".join(f"{what}.{a}={s}" for a, s in zip(MESH_AXES, shape))
  if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"{desc}: sizes must be positive, with at most one -1 (= fill)")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"{desc}: cannot fill {num_devices} devices ({num_devices} is not a "
                       f"multiple of {known})")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"{desc}: product {math.prod(shape)} != {num_devices} devices")
  return tuple(shape)


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh from config keys data/fsdp/tensor and dcn_data/... .

  DCN sizes (slices) multiply their ICI axes; device order comes from mesh_utils so that
  tensor, then fsdp, ride the fastest links.
  """
  devices = list(jax.devices() if devices is None else devices)
  dcn = {a: int(mesh_cfg.get(f"dcn_{a}", 1)) for a in MESH_AXES}
  num_slices = math.prod(dcn.values())
  if num_slices > 1:
    dcn_shape = mesh_shape(dcn, num_slices, "mesh.dcn")
    ici_shape = mesh_shape(mesh_cfg, len(devices) // num_slices)
    grid = _hybrid_grid(ici_shape, dcn_shape, devices)
  else:
    shape = mesh_shape(mesh_cfg, len(devices))
    try:
      grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
      grid = np.asarray(devices).reshape(shape)  # topologies mesh_utils cannot lay out
  return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _hybrid_grid(ici_shape, dcn_shape, devices) -> np.ndarray:
  """Slices along DCN, chips within a slice along ICI. CPU devices have no real slices (one
  process: no slice index; several, under launch.local: all in slice 0), so emulation treats
  each process as a slice, or, in one process, consecutive device blocks."""
  emulated = devices[0].platform == "cpu" or not hasattr(devices[0], "slice_index")
  by_process = emulated and len({d.process_index for d in devices}) > 1
  try:
    return mesh_utils.create_hybrid_device_mesh(ici_shape, dcn_shape, devices,
                                                process_is_granule=by_process)
  except (ValueError, NotImplementedError, AssertionError):
    if not emulated:
      raise
    grid = np.asarray(devices).reshape(*dcn_shape, *ici_shape)
    n = len(MESH_AXES)
    interleaved = [ax for i in range(n) for ax in (i, n + i)]  # each axis = (dcn, ici)
    return grid.transpose(interleaved).reshape([d * i for d, i in zip(dcn_shape, ici_shape)])


def logical_to_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """PartitionSpec for one array; a dimension that the mesh axes do not divide stays whole.

  (E.g. the single kv head of a multi-query model is replicated over `tensor`.)
  """
  used: set[str] = set()
  spec = []
  for name, dim in zip(axes, shape):
    if name is not None and name not in LOGICAL_RULES:
      raise ValueError(f"logical axis {name!r} has no rule in sharding.LOGICAL_RULES")
    mesh_axes = tuple(a for a in LOGICAL_RULES.get(name, ()) if a not in used and
                      mesh.shape.get(a, 1) > 1)  # a mesh may lack an axis (e.g. tensor)
    if not mesh_axes or dim % math.prod(mesh.shape[a] for a in mesh_axes):
      spec.append(None)
      continue
    used.update(mesh_axes)
    spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Pin an activation's layout by logical axes under the mesh set with `jax.set_mesh`;
  a no-op without one (single-device use)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def named_sharding(mesh: Mesh, axes: Sequence[str | None], shape: Sequence[int]) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))


def param_shardings(abstract_state, mesh: Mesh):
  """NamedShardings for a parameter pure dict, from an nnx.State whose Variables carry `axes`.

  Pass `nnx.split(abstract_model(cfg))[1]` (shapes only). Returns a pure dict.
  """
  from flax import nnx  # local: keep this module importable without building models

  is_var = lambda x: isinstance(x, nnx.Variable)
  shardings = jax.tree.map(lambda v: named_sharding(mesh, v.axes, v.shape), abstract_state,
                           is_leaf=is_var)
  return nnx.State(shardings).to_pure_dict() if isinstance(shardings, nnx.State) else shardings


def laid_out(abstract_state, mesh: Mesh | None = None) -> dict:
  """ShapeDtypeStructs (a pure dict) of an abstract nnx.State whose Variables carry `axes`,
  with the rule table's shardings on `mesh` (the first device without one): what arrays are
  initialised or restored into."""
  if mesh is None:
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    shardings = jax.tree.map(lambda _: device, abstract_state.to_pure_dict())
  else:
    shardings = param_shardings(abstract_state, mesh)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      abstract_state.to_pure_dict(), shardings)


def batch_axes(mesh: Mesh | jax.sharding.AbstractMesh) -> tuple[str, ...]:
  """The mesh axes a batch is split over: the rule of the logical axis `batch`, in this mesh.
  Everything that splits a batch (data pipeline, train step, losses, sampler) asks here."""
  return tuple(a for a in LOGICAL_RULES["batch"] if a in mesh.axis_names)


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension over the batch axes; the rest whole."""
  return NamedSharding(mesh, PartitionSpec(batch_axes(mesh), *([None] * (ndim - 1))))


def host_rows(x: jax.Array) -> np.ndarray:
  """The rows of a batch-sharded array that this process holds, in order, as NumPy."""
  shards = {}
  for shard in x.addressable_shards:
    shards.setdefault(shard.index[0].indices(x.shape[0])[0], shard.data)
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def global_batch(mesh: Mesh, local: np.ndarray, rows: int) -> jax.Array:
  """A batch-sharded global array of `rows` rows from this process's block of them."""
  return jax.make_array_from_process_local_data(batch_sharding(mesh, local.ndim), local,
                                                (rows, *local.shape[1:]))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def tree_shardings_like(tree, params, param_shardings_tree, mesh: Mesh):
  """Shardings for an optimizer-state-like pytree: any leaf whose path ends with a parameter's
  path and has its shape (Adam's mu and nu, ...) takes that parameter's sharding; the rest
  (step counts, scalars) is replicated."""
  by_path = {}
  for path, (p, s) in _leaves_with_path((params, param_shardings_tree)):
    by_path[path] = (tuple(p.shape), s)

  def pick(path, leaf):
    keys = _path_keys(path)
    for start in range(len(keys)):
      hit = by_path.get(keys[start:])
      if hit and hit[0] == tuple(np.shape(leaf)):
        return hit[1]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, tree)


def _path_keys(path) -> tuple:
  return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


def _leaves_with_path(pair):
  params, shardings = pair
  flat_p = jax.tree_util.tree_flatten_with_path(params)[0]
  flat_s = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  return [(_path_keys(path), (p, s)) for (path, p), s in zip(flat_p, flat_s)]


def replicated_param_bytes(params, shardings) -> tuple[int, int]:
  """(bytes of fully replicated parameters per device, total parameter bytes)."""
  flat_s = jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
  total = replicated_bytes = 0
  for p, s in zip(jax.tree.leaves(params), flat_s):
    nbytes = math.prod(p.shape) * np.dtype(p.dtype).itemsize
    total += nbytes
    if s.is_fully_replicated and s.num_devices > 1:
      replicated_bytes += nbytes
  return replicated_bytes, total


def check_replication(params, shardings, max_fraction: float) -> dict[str, float]:
  """Guard against silently replicated weights (e.g. a rule that matches nothing).

  Raises when more than `max_fraction` of the parameter bytes sit whole on every device.
  """
  rep, total = replicated_param_bytes(params, shardings)
  report = {"replicated_param_bytes": rep, "param_bytes": total,
            "replicated_fraction": rep / max(total, 1)}
  if report["replicated_fraction"] > max_fraction:
    raise ValueError(
        f"{rep:,} of {total:,} parameter bytes ({report['replicated_fraction']:.1%}) are "
        f"replicated on every device, above sharding.max_replicated_fraction={max_fraction}; "
        "check the mesh and sharding.LOGICAL_RULES")
  return report
