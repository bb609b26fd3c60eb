"""Optax chains, learning-rate schedules and the weight-decay mask."""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import optax

from bigmodel.config import ConfigError, OptimConfig

if TYPE_CHECKING:
  from bigmodel.prune import PruneConfig

NO_DECAY_NAMES = ("bias", "scale", "norm")


def schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then cosine, linear or constant decay.

  The rate of update t (counted from 0) is lr(t), so with warmup the first update uses
  lr(0) = 0: it moves no weight (AdamW's decoupled weight decay is scaled by the rate too)
  but it does feed the first gradient into Adam's moments. Kept on purpose, as MaxText's
  warmup (linear from 0 at step 0) and optax's `warmup_cosine_decay_schedule` (init_value
  0) do: a run reaches the peak exactly at `warmup_steps` as the config says, and schedules
  stay comparable with those codebases step for step. The cost is one update in
  `warmup_steps` (none without warmup: with `warmup_steps = 0` the first update uses the
  peak rate). tests/test_loop.py pins both.
  """
  peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_lr_fraction
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  decay_steps = max(total_steps - warmup, 1)
  if cfg.decay == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.end_lr_fraction)
  elif cfg.decay == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif cfg.decay == "constant":
    decay = optax.constant_schedule(peak)
  else:
    raise ConfigError(f"OptimConfig.decay={cfg.decay!r}: expected cosine, linear or constant")
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _path_names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def decay_mask(params):
  """True where weight decay applies: matrices, not norms, biases or 1-D params."""
  def decide(path, leaf):
    names = _path_names(path)
    if any(n in NO_DECAY_NAMES or n.endswith("_bias") or n.startswith("ln") for n in names):
      return False
    return getattr(leaf, "ndim", 2) >= 2
  return jax.tree_util.tree_map_with_path(decide, params)


def make(cfg: OptimConfig, total_steps: int,
         pruning: PruneConfig | None = None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optimizer chain, lr schedule). `pruning`: a prune.PruneConfig (`Experiment.prune`) or None."""
  lr = schedule(cfg, total_steps)
  if cfg.name == "adamw":
    opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                      mask=decay_mask)
  elif cfg.name == "lamb":
    opt = optax.lamb(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
                     mask=decay_mask)
  elif cfg.name == "adafactor":
    opt = optax.adafactor(lr, weight_decay_rate=cfg.weight_decay or None,
                          weight_decay_mask=decay_mask)
  elif cfg.name == "sgd":      # plain gradient descent, params -= lr * grad (experiments/maths)
    opt = optax.sgd(lr)
  else:
    raise ConfigError(f"OptimConfig.name={cfg.name!r}: expected adamw, adafactor, lamb or sgd")
  if cfg.clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
  from bigmodel import prune     # magnitude pruning when pruning.sparsity > 0 (prune.py)
  return prune.maybe_wrap(opt, total_steps, pruning), lr
