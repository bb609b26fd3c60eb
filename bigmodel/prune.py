"""Magnitude pruning during fine-tuning: global unstructured sparsity on a schedule.

    PruneConfig.sparsity = 0.8          # final share of prunable weights set to 0 (0: off)
    PruneConfig.begin_step = 0
    PruneConfig.end_step = 0            # 0: 3/4 of train_steps
    PruneConfig.frequency = 10          # recompute the mask every this many steps

config.load builds PruneConfig as `Experiment.prune` when a binding names it (else None), and
`optim.make` given it appends `transform` to the optimizer chain when `sparsity > 0`. The sparsity
follows Zhu & Gupta 2017 ("To prune, or not to prune"): s(t) = s_f + (s_i - s_f) (1 - p)^3
with p = (t - begin) / (end - begin) clipped to [0, 1], so it rises fast and levels off.
At steps begin, begin + frequency, ... and at end, the mask is recomputed from the
updated weights: one global threshold over all prunable weights (every weight matrix: 2-D or
larger, not the embedding tables; biases and norms are never pruned) keeps the largest
magnitudes and zeros the floor(s * N) smallest. Between recomputations the mask holds: a
pruned weight is set to exactly 0 by every update (its Adam moments still run, unused).

Unstructured sparsity gives no speed-up by itself on CPU (or TPU/GPU): XLA runs the same
dense matmuls whatever share of the weights is zero. It makes a model smaller only when
stored sparse or compressed, and faster only with sparse kernels or structured (N:M, block,
whole-head/neuron) sparsity, which this module does not do.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import gin
import jax
import jax.numpy as jnp
import optax

from bigmodel.config import ConfigError

SKIP_NAMES = ("embed", "embedding")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PruneConfig:
  sparsity: float = 0.0             # final global sparsity of the prunable weights (0: off)
  initial_sparsity: float = 0.0     # s_i at begin_step
  begin_step: int = 0
  end_step: int = 0                 # 0: 3/4 of train_steps
  frequency: int = 10               # mask recomputed every `frequency` steps in [begin, end]

  def check(self, total_steps: int) -> "PruneConfig":
    """The config with end_step filled in; a ConfigError for impossible settings."""
    if not 0.0 <= self.sparsity < 1.0 or not 0.0 <= self.initial_sparsity <= self.sparsity:
      raise ConfigError(f"PruneConfig: need 0 <= initial_sparsity ({self.initial_sparsity}) <= "
                        f"sparsity ({self.sparsity}) < 1")
    if self.frequency < 1:
      raise ConfigError(f"PruneConfig.frequency={self.frequency}: use at least 1")
    end = self.end_step or max(int(0.75 * total_steps), self.begin_step)
    if not 0 <= self.begin_step <= end or (total_steps and end >= total_steps):
      raise ConfigError(f"PruneConfig: need 0 <= begin_step ({self.begin_step}) <= end_step "
                        f"({end}) < train_steps ({total_steps}) so the last mask is applied")
    return dataclasses.replace(self, end_step=end)


def sparsity_at(cfg: PruneConfig, step) -> jax.Array:
  """Zhu & Gupta's cubic schedule: initial_sparsity at begin_step -> sparsity at end_step."""
  span = max(cfg.end_step - cfg.begin_step, 1)
  p = jnp.clip((jnp.asarray(step, jnp.float32) - cfg.begin_step) / span, 0.0, 1.0)
  return cfg.sparsity + (cfg.initial_sparsity - cfg.sparsity) * (1.0 - p) ** 3


def is_update_step(cfg: PruneConfig, step) -> jax.Array:
  step = jnp.asarray(step)
  in_range = (step >= cfg.begin_step) & (step <= cfg.end_step)
  return in_range & (((step - cfg.begin_step) % cfg.frequency == 0) | (step == cfg.end_step))


def _names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def prunable(params) -> list[bool]:
  """Per leaf (in tree order): weight matrices (ndim >= 2) outside the embeddings."""
  flat, _ = jax.tree_util.tree_flatten_with_path(params)
  return [getattr(x, "ndim", 0) >= 2 and not any(s in n.lower() for n in _names(p)
                                                 for s in SKIP_NAMES) for p, x in flat]


def global_masks(leaves: list, flags: list[bool], sparsity) -> list:
  """Masks (True: kept) for the flagged leaves from one magnitude threshold over all of them:
  the floor(sparsity * N) smallest |w| go (ties at the threshold go too); others: None."""
  mags = jnp.concatenate([jnp.abs(x).ravel() for x, f in zip(leaves, flags) if f])
  k = jnp.floor(sparsity * mags.size).astype(jnp.int32)
  thr = jnp.where(k > 0, jnp.sort(mags)[jnp.maximum(k - 1, 0)], -1.0)
  return [jnp.abs(x) > thr if f else None for x, f in zip(leaves, flags)]


class PruneState(NamedTuple):
  count: jax.Array        # updates so far (int32)
  masks: Any              # bool, like the params (True: kept); non-prunable leaves stay True


def transform(cfg: PruneConfig) -> optax.GradientTransformation:
  """Last link of the chain: params + updates, masked; needs `params` in `update`."""
  def init(params):
    return PruneState(jnp.zeros((), jnp.int32),
                      jax.tree.map(lambda p: jnp.ones(p.shape, bool), params))

  def update(updates, state, params=None):
    if params is None:
      raise ValueError("prune.transform needs params in update()")
    flags = prunable(params)
    p_leaves, treedef = jax.tree.flatten(params)
    u_leaves, m_leaves = treedef.flatten_up_to(updates), treedef.flatten_up_to(state.masks)
    new = [jnp.where(m, p + u, 0) if f else p + u
           for p, u, m, f in zip(p_leaves, u_leaves, m_leaves, flags)]

    def recompute():
      fresh = global_masks(new, flags, sparsity_at(cfg, state.count))
      return [f if f is not None else m for f, m in zip(fresh, m_leaves)]

    masks = jax.lax.cond(is_update_step(cfg, state.count), recompute, lambda: list(m_leaves))
    out = [(jnp.where(m, n, 0) - p).astype(u.dtype) if f else u
           for n, m, p, u, f in zip(new, masks, p_leaves, u_leaves, flags)]
    return (jax.tree.unflatten(treedef, out),
            PruneState(state.count + 1, jax.tree.unflatten(treedef, masks)))

  return optax.GradientTransformation(init, update)


def maybe_wrap(tx: optax.GradientTransformation, total_steps: int,
               cfg: PruneConfig | None) -> optax.GradientTransformation:
  """`tx` followed by the pruning step when cfg.sparsity > 0, else `tx` itself (cfg None: off)."""
  if cfg is None or cfg.sparsity <= 0:
    return tx
  return optax.chain(tx, transform(cfg.check(total_steps)))


def sparsity(params) -> dict[str, float]:
  """The zero share of the prunable weights and of all params (for reports)."""
  leaves, flags = jax.tree.leaves(params), prunable(params)
  zeros = [int(jnp.sum(x == 0)) for x in leaves]
  sizes = [int(x.size) for x in leaves]
  pz = sum(z for z, f in zip(zeros, flags) if f)
  pn = sum(n for n, f in zip(sizes, flags) if f)
  return {"prunable": pn, "prunable_sparsity": pz / max(pn, 1),
          "total_sparsity": sum(zeros) / max(sum(sizes), 1)}
