"""Mesh axes, THE logical-axis rule table, mesh construction, sharding helpers.

Mesh axes:
  data    pure data parallelism (params replicated)
  fsdp    data parallelism with params, grads and optimizer state sharded (ZeRO-3)
  tensor  Megatron-style model parallelism over heads and the MLP hidden dim

Weights and activations carry different logical names (`embed` vs `act_embed`),
so that sharding weights over `fsdp` never forces activations to follow.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from bigmodel.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# The one rule table: logical axis name -> mesh axis (or axes, or None).
RULES: tuple[tuple[str, Any], ...] = (
    # weights
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    # Grouped-query attention's key/value heads (`ModelConfig.num_kv_heads` < num_heads): over
    # `tensor` where their count divides it, else replicated. Params and caches get this from
    # `logical_to_sharding(..., shapes)` (undivisible dims unsharded); activations from
    # `kv_heads_axis`, which names the axis only where it divides.
    ("kv_heads", "tensor"),
    ("kv", None),
    ("qkv", None),
    ("mlp", "tensor"),
    ("layers", None),
    ("norm", None),
    ("pos", None),
    ("classes", None),
    ("lora", None),          # LoRA adapters' rank (models/lora.py)
    # activations
    ("act_batch", BATCH_AXES),
    ("act_len", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
)
RULE_NAMES = frozenset(name for name, _ in RULES)


def resolve_mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
  sizes = [cfg.data, cfg.fsdp, cfg.tensor]
  free = [i for i, s in enumerate(sizes) if s == -1]
  if len(free) > 1:
    raise ConfigError(f"mesh {cfg}: at most one axis may be -1")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
    raise ConfigError(f"mesh {cfg} does not fit {num_devices} devices: the axis sizes must "
                      f"multiply to {num_devices} (use -1 for one axis to take the rest)")
  if free:
    sizes[free[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices "
                      f"but {num_devices} are available; set one axis to -1")
  return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh with Auto axis types (set explicitly)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = resolve_mesh_shape(cfg, len(devices))
  if devices == list(jax.devices()):
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
  return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3)


def batch_size_per(mesh: Mesh) -> int:
  """Number of ways the batch is split: data x fsdp."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch(batch_size: int, mesh: Mesh, microbatches: int = 1) -> None:
  ways = batch_size_per(mesh)
  if batch_size % microbatches:
    raise ConfigError(f"TrainConfig.batch_size={batch_size} is not divisible by "
                      f"TrainConfig.microbatches={microbatches}")
  micro = batch_size // microbatches
  if micro % ways:
    raise ConfigError(
        f"batch size {micro} (TrainConfig.batch_size={batch_size} / microbatches={microbatches}) "
        f"is not divisible by the data-parallel size {ways} (mesh data={mesh.shape['data']} x "
        f"fsdp={mesh.shape['fsdp']}); choose a batch size that is a multiple of {ways} "
        f"or change MeshConfig")


def constrain(x: jax.Array, axes: tuple[str | None, ...], mesh: Mesh | None) -> jax.Array:
  """Sharding constraint on an activation by logical names (no-op without a mesh)."""
  unknown = [a for a in axes if a is not None and a not in RULE_NAMES]
  if unknown:
    raise ValueError(f"logical axes {unknown} have no rule in bigmodel.sharding.RULES")
  if mesh is None:
    return x
  return nn.with_logical_constraint(x, axes, rules=RULES, mesh=mesh)


def kv_heads_axis(num_kv_heads: int, mesh: Mesh | None) -> str | None:
  """The logical name of a [.., g, ..] key/value-heads activation dim: 'act_kv_heads' (sharded
  over `tensor`) when g divides the tensor axis, else None (replicated)."""
  if mesh is None or num_kv_heads % mesh.shape["tensor"] == 0:
    return "act_kv_heads"
  return None


def logical_to_sharding(logical_specs: Any, mesh: Mesh, shapes: Any = None) -> Any:
  """Tree of logical PartitionSpecs -> tree of NamedShardings.

  With `shapes` (a matching tree of arrays or ShapeDtypeStructs), a dimension that its
  mesh axes do not divide (say a vocabulary of 257 over tensor=2) is left unsharded
  rather than failing; pad such dimensions to a multiple of the mesh for best layout.
  """
  shardings = nn.logical_to_mesh_sharding(logical_specs, mesh, RULES)
  if shapes is None:
    return shardings
  return jax.tree.map(lambda s, x: _divisible(s, x.shape, mesh), shardings, shapes)


def _divisible(s: NamedSharding, shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
  spec = list(s.spec) + [None] * (len(shape) - len(s.spec))
  changed = False
  for dim, axes in enumerate(spec):
    if axes is None:
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    if shape[dim] % math.prod(mesh.shape[a] for a in names):
      spec[dim] = None
      changed = True
  return NamedSharding(mesh, P(*spec)) if changed else s


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(BATCH_AXES))


def logical_names(tree: Any) -> set[str]:
  """All logical axis names in a tree of PartitionSpecs / boxed params."""
  names: set[str] = set()
  specs = nn.get_partition_spec(tree)
  for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)):
    if isinstance(spec, P):
      for entry in spec:
        if entry is None:
          continue
        names.update((entry,) if isinstance(entry, str) else entry)
  return names


def host_batch_slice(mesh: Mesh, global_batch: int) -> tuple[int, int]:
  """(first row, row count) of the global batch that this process's devices hold.

  Derived from the batch sharding itself, so it holds for any device order.
  """
  indices = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
  starts = sorted({(idx[0].start or 0, idx[0].stop or global_batch) for idx in indices.values()})
  first, last = starts[0][0], starts[-1][1]
  covered = sum(b - a for a, b in starts)
  if covered != last - first:
    raise ValueError(f"this process's batch rows {starts} are not contiguous; use a mesh whose "
                     f"data axes follow process order")
  return first, last - first
