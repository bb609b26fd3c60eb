"""Train state, its shardings, and sharded initialization.

Shardings come from the logical axes each parameter declares: `jax.eval_shape`
of the initializer gives boxed abstract params, `nn.get_partition_spec` their
logical specs, and the one rule table the mesh shardings. The optimizer state is
initialized from the same boxed tree, so its moments inherit the specs. The real
initialization then runs under `jit` with those out_shardings: no parameter ever
exists unsharded.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding

from bigmodel import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


def init_fn(model: nn.Module, tx: optax.GradientTransformation, model_args: tuple) -> Callable:
  """rng -> TrainState (boxed: params still carry their logical axes)."""
  def init(rng):
    variables = model.init({"params": rng}, *model_args, deterministic=True)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return init


def abstract_state(model, tx, model_args) -> tuple[TrainState, Any]:
  """(abstract unboxed state, logical PartitionSpecs of the state)."""
  boxed = jax.eval_shape(init_fn(model, tx, model_args), jax.random.key(0))
  return nn.meta.unbox(boxed), nn.get_partition_spec(boxed)


def state_shardings(model, tx, model_args, mesh: Mesh) -> tuple[TrainState, TrainState]:
  """(abstract state as ShapeDtypeStructs with shardings, the NamedSharding tree)."""
  abstract, specs = abstract_state(model, tx, model_args)
  shardings = sharding.logical_to_sharding(specs, mesh, abstract)
  with_sharding = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                               abstract, shardings)
  return with_sharding, shardings


def init_state(model, tx, model_args, mesh: Mesh, rng: jax.Array) -> TrainState:
  _, shardings = state_shardings(model, tx, model_args, mesh)
  init = init_fn(model, tx, model_args)
  jitted = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)
  return jitted(rng)


def param_count(params, exclude: tuple[str, ...] = ()) -> int:
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [str(getattr(k, "key", k)) for k in path]
    if any(e in names for e in exclude):
      continue
    total += int(leaf.size)
  return total
