"""LoRA (Hu et al. 2021): low-rank adapters beside a model's projections, the base frozen.

A projection `y = einsum(eq, x, W)` whose weight W has input dims I (contracted with x) and
output dims O gets, when `ModelConfig.lora_rank` r > 0 and its name is in `lora_targets`,

    y += (lora_alpha / r) * einsum(einsum(x, A), B)     A [I.., r] ~ normal(1 / sqrt(|I|))
                                                         B [r, O..] = 0

computed through the rank-r activation, never through a merged W + A B. So a new adapter
leaves the model's output exactly as the base gives it. The adapters live beside W in the same
module, named W's name + `_lora_a` / `_lora_b` (attn/qkv_lora_a, mlp/wo_lora_b, ...), with W's
logical axes on I and O and `lora` (replicated) on r: they shard as W does, and with scanned
layers they stack on `layers` as W does. With lora_rank 0 nothing is created: the param tree
is the plain model's.

Training (`freeze_base` around the run's optimizer, `stop_frozen_gradients` in the train step):
only the adapters are trained, plus a task head that a base checkpoint lacks
(`models.heads.FRESH_PARAMS`, e.g. `classifier`); everything else (embeddings, norms, biases,
the projections) is frozen: no gradient is computed for it (stop_gradient: the weight-gradient
matmuls are not in the program), the optimizer keeps no state for it, and its update is zero,
so it stays bitwise what `TrainConfig.init_checkpoint` loaded. The optimizer (clipping, AdamW,
its weight decay by `optim.decay_mask`) sees the trainable leaves alone: weight decay
(OptimConfig.weight_decay) applies to A and B, pulling the adapters' product toward zero, i.e.
toward the base model; set it to 0 to turn that off.

`merge(params, cfg)` folds the adapters in: W + (alpha / r) A B, the adapter leaves dropped,
the plain model's tree (see bigmodel/interop/lora_workdir.py for `bigmodel lora merge/export`).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

SUFFIX_A, SUFFIX_B = "_lora_a", "_lora_b"
RANK_AXIS = "lora"        # sharding.RULES: replicated


def enabled(cfg, name: str) -> bool:
  return cfg.lora_rank > 0 and name in cfg.lora_targets


def project(module: nn.Module, name: str, eq: str, x: jax.Array, w: jax.Array,
            axes: tuple[str, ...], n_in: int = 1) -> jax.Array:
  """`einsum(eq, x, w)` in the compute dtype, plus the LoRA term when `name` is a target.

  eq: the projection, e.g. "bsd,dnhk->nbshk"; its weight's first `n_in` letters are the input
  dims (shared with x), the rest the output dims. axes: W's logical axes. Call inside
  `module`'s compact __call__ (the adapters are its params)."""
  cfg = module.cfg
  dt = jnp.dtype(cfg.dtype)
  y = jnp.einsum(eq, x, w.astype(dt))
  if not enabled(cfg, name):
    return y
  ins, out = eq.split("->")
  x_spec, w_spec = ins.split(",")
  in_dims, out_dims = w_spec[:n_in], w_spec[n_in:]
  lead = "".join(c for c in x_spec if c not in in_dims)
  r, pdt = cfg.lora_rank, jnp.dtype(cfg.param_dtype)
  fan_in = 1
  for size in w.shape[:n_in]:
    fan_in *= size
  a = module.param(name + SUFFIX_A, nn.with_logical_partitioning(
      nn.initializers.normal(fan_in ** -0.5), tuple(axes[:n_in]) + (RANK_AXIS,)),
      tuple(w.shape[:n_in]) + (r,), pdt)
  b = module.param(name + SUFFIX_B, nn.with_logical_partitioning(
      nn.initializers.zeros, (RANK_AXIS,) + tuple(axes[n_in:])), (r,) + tuple(w.shape[n_in:]), pdt)
  low = jnp.einsum(f"{x_spec},{in_dims}r->{lead}r", x, a.astype(dt))
  delta = jnp.einsum(f"{lead}r,r{out_dims}->{out}", low, b.astype(dt))
  return y + (cfg.lora_alpha / r) * delta


# ----------------------------------------------------------------------------- the param tree


def is_adapter(name: str) -> bool:
  return name.endswith(SUFFIX_A) or name.endswith(SUFFIX_B)


def _fresh_heads() -> tuple[str, ...]:
  from bigmodel.models.heads import FRESH_PARAMS
  return FRESH_PARAMS


def is_node(value) -> bool:
  """Whether a params-tree entry is a sub-tree (dict, FrozenDict) rather than a leaf."""
  return hasattr(value, "items")


def select(tree, keep, prefix: str = "") -> dict:
  """The sub-tree (nested dicts) of the entries whose '/'-joined path `keep(path, is_node)`
  accepts (an accepted node whole), empty dicts dropped. train/frozen.py selects with it too."""
  out = {}
  for key, value in tree.items():
    path = f"{prefix}{key}"
    node = is_node(value)
    if keep(path, node):
      out[key] = value
    elif node:
      sub = select(value, keep, path + "/")
      if sub:
        out[key] = sub
  return out


def _name(path: str) -> str:
  return path.rsplit("/", 1)[-1]


def trainable(params) -> dict:
  """The trained part of a LoRA model's params: every adapter and any fresh task head."""
  heads = _fresh_heads()
  return select(params, lambda path, node: is_adapter(_name(path)) or path in heads)


def adapters(params) -> dict:
  """The adapters alone (nested like params)."""
  return select(params, lambda path, node: is_adapter(_name(path)))


def without_adapters(params) -> dict:
  """params with every adapter removed (the base model's tree)."""
  out = {}
  for key, value in params.items():
    if is_adapter(key):
      continue
    out[key] = without_adapters(value) if is_node(value) else value
  return out


def fill(full, part, fill_leaf=jnp.zeros_like):
  """`full`'s tree with `part`'s leaves where `part` has them, else `fill_leaf(leaf)` (`part`: a
  sub-tree of `full`, as `trainable` gives; train/frozen.py uses it too)."""
  out = {}
  for key, value in full.items():
    if key in part and not is_node(part[key]):
      out[key] = part[key]
    elif is_node(value):
      out[key] = fill(value, part.get(key, {}), fill_leaf)
    else:
      out[key] = fill_leaf(value)
  return out


def overlay(full, part) -> dict:
  """`full`'s tree with `part`'s leaves wherever `part` has them."""
  return fill(full, part, lambda leaf: leaf)


def stop_frozen_gradients(params, cfg):
  """params with stop_gradient on every frozen leaf (a no-op without LoRA): the backward pass
  then computes gradients for the trained leaves only."""
  if not cfg or not getattr(cfg, "lora_rank", 0):
    return params
  return fill(params, trainable(params), jax.lax.stop_gradient)


def freeze_base(inner: optax.GradientTransformation) -> optax.GradientTransformation:
  """`inner` on the trainable leaves only (its state holds nothing for the frozen ones); the
  frozen leaves' updates are zeros."""
  return freeze(inner, trainable)


def freeze(inner: optax.GradientTransformation, select) -> optax.GradientTransformation:
  """`inner` on the sub-tree `select(tree)` of the params (and of the gradients) only: its
  state holds nothing for the other leaves, whose updates are zeros (LoRA's base here,
  OptimConfig.frozen_params in train/frozen.py)."""

  def init(params):
    return inner.init(select(params))

  def update(grads, state, params=None):
    sub_params = None if params is None else select(params)
    updates, state = inner.update(select(grads), state, sub_params)
    return fill(grads, updates), state

  return optax.GradientTransformation(init, update)


def merge(params, cfg) -> dict:
  """The plain model's params: each targeted W + (alpha / r) A B (in float32, then W's dtype),
  the adapters dropped."""
  scale = cfg.lora_alpha / cfg.lora_rank
  out = {}
  for key, value in params.items():
    if is_adapter(key):
      continue
    if is_node(value):
      out[key] = merge(value, cfg)
    elif key + SUFFIX_A in params:
      out[key] = _merged(value, params[key + SUFFIX_A], params[key + SUFFIX_B], scale)
    else:
      out[key] = value
  return out


def _merged(w, a, b, scale):
  n_lead = a.ndim + b.ndim - 2 - w.ndim        # the stacked `layers` axis, if any
  n_in = a.ndim - 1 - n_lead
  letters = "abcdefghijklmnopq"
  lead, ins, outs = (letters[:n_lead], letters[n_lead:n_lead + n_in],
                     letters[n_lead + n_in:w.ndim])
  delta = jnp.einsum(f"{lead}{ins}r,{lead}r{outs}->{lead}{ins}{outs}",
                     a.astype(jnp.float32), b.astype(jnp.float32))
  return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)


def count(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
