"""Bad-step guard: an optax wrapper that skips an update whose loss or gradient is not finite,
or whose loss spikes, on device, inside the jitted step.

    tx = guard(optim.make(...)[0], window=32, zscore=6.0, max_in_a_row=5)
    updates, opt_state = tx.update(grads, opt_state, params, value=loss)

A step is bad when its loss, gradient norm or update norm is not finite, or (once `window` good
losses are seen) its loss lies more than `zscore` standard deviations above the mean of the
last `window` good losses (one-sided: a loss that falls is never a spike; the deviation has a
floor of 1% of the mean, so a flat loss curve does not make every wobble a spike). A bad step's
updates are zeros and the inner optimizer state is kept as it was (params and moments
unchanged, as `optax.apply_if_finite` does; the inner schedule count does not advance either),
and it enters the counters. After `max_in_a_row` bad steps in a row the guard latches: every
later update is skipped too, until the host (which reads `bad_run` at log and checkpoint steps)
stops the run. Params therefore never take a non-finite value, and no checkpoint holds one.

The state lives in the optimizer state, so a checkpoint carries the loss window and counters
and a resumed run decides exactly as the uninterrupted one would.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from bigmodel import optim
from bigmodel.config import ConfigError, Experiment

NONFINITE, SPIKE = 1, 2   # `last_reason` codes


class GuardState(NamedTuple):
  inner: optax.OptState
  losses: jax.Array       # [window] the last good losses (a ring)
  seen: jax.Array         # good losses seen so far (int32)
  bad_run: jax.Array      # bad steps in a row up to now (latched at max_in_a_row)
  bad_total: jax.Array    # bad steps skipped in the run
  last_reason: jax.Array  # NONFINITE or SPIKE, of the latest bad step (0: none yet)


def is_guarded(opt_state) -> bool:
  return isinstance(opt_state, GuardState)


def spike(loss, losses, seen, window: int, zscore: float):
  """Whether `loss` lies more than `zscore` deviations above the window's mean."""
  if window <= 0 or zscore <= 0:
    return jnp.zeros((), bool)
  mean = jnp.mean(losses)
  std = jnp.maximum(jnp.std(losses), 0.01 * jnp.abs(mean))
  return (seen >= window) & (loss > mean + zscore * std)


def guard(inner: optax.GradientTransformation, *, window: int = 32, zscore: float = 6.0,
          max_in_a_row: int = 5) -> optax.GradientTransformationExtraArgs:
  """Wraps `inner`; its update takes the step's mean loss as `value`."""
  n = max(window, 1)

  def init(params):
    zero = jnp.zeros((), jnp.int32)
    return GuardState(inner.init(params), jnp.zeros((n,), jnp.float32), zero, zero, zero, zero)

  def update(grads, state: GuardState, params=None, *, value, **extra):
    del extra
    loss = jnp.asarray(value, jnp.float32)
    updates, inner_state = inner.update(grads, state.inner, params)
    finite = (jnp.isfinite(loss) & jnp.isfinite(optax.tree.norm(grads))
              & jnp.isfinite(optax.tree.norm(updates)))
    spiked = finite & spike(loss, state.losses, state.seen, window, zscore)
    bad = ~finite | spiked
    latched = state.bad_run >= max_in_a_row
    bad_run = jnp.where(latched, state.bad_run, jnp.where(bad, state.bad_run + 1, 0))
    skip = bad | (bad_run >= max_in_a_row)
    updates = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), updates)
    inner_state = jax.tree.map(lambda new, old: jnp.where(skip, old, new), inner_state, state.inner)
    losses = jnp.where(skip, state.losses, state.losses.at[state.seen % n].set(loss))
    reason = jnp.where(~finite, NONFINITE, jnp.where(spiked, SPIKE, state.last_reason))
    return updates, GuardState(inner_state, losses, state.seen + (~skip).astype(jnp.int32), bad_run,
                               state.bad_total + skip.astype(jnp.int32), reason.astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init, update)


def step_metrics(opt_state) -> dict:
  """The guard's counters for the step's metrics (empty without a guard)."""
  if not is_guarded(opt_state):
    return {}
  return {"bad_steps": opt_state.bad_total, "bad_run": opt_state.bad_run,
          "bad_reason": opt_state.last_reason}


def describe(reason: int) -> str:
  return {NONFINITE: "a non-finite loss or gradient", SPIKE: "a loss spike"}.get(int(reason),
                                                                                 "a bad step")


def make_optimizer(exp: Experiment):
  """(tx, lr schedule): OptimConfig's chain inside the bad-step guard of TrainConfig
  (max_bad_steps 0: no guard, the optimizer state of checkpoints written before it). With
  ModelConfig.lora_rank the chain acts on the trainable leaves only (models/lora.py)."""
  tx, lr = optim.make(exp.optim, exp.train.train_steps, exp.prune)
  if exp.model.lora_rank:       # LoRA: the chain sees the adapters alone, the base is frozen
    from bigmodel.models import lora
    tx = lora.freeze_base(tx)
  if exp.optim.frozen_params:   # OptimConfig.frozen_params: no state, zero update (train/frozen.py)
    from bigmodel.train import frozen
    tx = frozen.freeze(tx, tuple(exp.optim.frozen_params))
  tc = exp.train
  if tc.max_bad_steps < 0:
    raise ConfigError(f"TrainConfig.max_bad_steps={tc.max_bad_steps}: use at least 1 (0: no guard)")
  if tc.max_bad_steps == 0:
    return tx, lr
  return guard(tx, window=tc.spike_window, zscore=tc.spike_zscore,
                         max_in_a_row=tc.max_bad_steps), lr
