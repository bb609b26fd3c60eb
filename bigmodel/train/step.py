"""The jitted train and eval steps: built once, explicit in/out shardings, state donated."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from bigmodel import sharding
from bigmodel.models import lora
from bigmodel.train import accumulate, bad_steps, dp, frozen as frozen_lib
from bigmodel.train.state import TrainState


def _split_microbatches(batch: dict, k: int) -> dict:
  """[b, ...] -> [k, b/k, ...], example i going to microbatch i % k, so that every
  device keeps its rows (the batch dim stays sharded, no resharding)."""
  def split(x):
    x = x.reshape((x.shape[0] // k, k) + x.shape[1:])
    return jnp.swapaxes(x, 0, 1)
  return jax.tree.map(split, batch)


def _over_microbatches(batch_grads, params, batch: dict, rng, microbatches: int):
  """`batch_grads(params, microbatch, key)` summed over the batch's microbatches, microbatch i
  with the key fold_in(rng, i) (the whole batch with `rng` when there is one)."""
  if microbatches == 1:
    return batch_grads(params, batch, rng)
  return accumulate.scan_sum(lambda x: batch_grads(params, x[1], jax.random.fold_in(rng, x[0])),
                             (jnp.arange(microbatches), _split_microbatches(batch, microbatches)))


def make_train_step(model, tx: optax.GradientTransformation, lr_schedule: optax.Schedule,
                    loss_fn: Callable, mesh, state_sh, *, microbatches: int = 1,
                    seed: int = 0, dp_clip: float = 0.0, dp_noise: float = 0.0,
                    frozen: tuple[str, ...] = (), dp_one_at_a_time: bool | None = None) -> Callable:
  """(state, batch) -> (state, metrics). `loss_fn(model, params, batch, deterministic, rngs)`
  returns (summed loss, aux with a summed `weight`); the step divides by the total weight,
  so k microbatches give the same update as one k-times-larger batch. With a bad-step guard
  around `tx` (train/bad_steps.py) the update sees the mean loss and the metrics carry the
  guard's counters; the step stays one jitted function with the state donated.

  With `dp_clip` > 0 (DP-SGD, train/dp.py) the gradient is instead the sum of per-example
  gradients clipped to `dp_clip`, plus N(0, (dp_noise * dp_clip)^2) noise drawn once per global
  batch, over the batch size; the guard then sees no loss (no data-dependent spike test). The
  per-example gradients are taken under vmap, or on XLA:CPU one example at a time
  (`dp_one_at_a_time`, default by the mesh's backend; dp.clipped_sum says why).

  `frozen` (OptimConfig.frozen_params, train/frozen.py): the loss is differentiated with respect
  to the other leaves only (no gradient, no noise for the frozen ones; `tx` zeroes their update)."""

  def grads_of(params, batch, rng):
    def f(trained):
      p = lora.overlay(params, trained) if frozen else trained
      p = lora.stop_frozen_gradients(p, getattr(model, "cfg", None))   # LoRA: no base gradients
      return loss_fn(model, p, batch, deterministic=False, rngs={"dropout": rng})
    return jax.value_and_grad(f, has_aux=True)(
        frozen_lib.trainable(params, frozen) if frozen else params)

  one_at_a_time = dp.per_example_on_cpu(mesh) if dp_one_at_a_time is None else dp_one_at_a_time

  def batch_grads(params, batch, rng):
    """((loss_sum, aux), gradient sum[, clipped rows]) of a (micro)batch."""
    if dp_clip > 0:
      return dp.clipped_sum(grads_of, params, batch, rng, dp_clip, one_at_a_time=one_at_a_time)
    return grads_of(params, batch, rng)

  def step(state: TrainState, batch: dict):
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    out = _over_microbatches(batch_grads, state.params, batch, rng, microbatches)
    (loss_sum, aux), grads = out[:2]
    weight = jnp.maximum(aux["weight"], 1.0)
    loss = loss_sum / weight
    extra = {}
    if dp_clip > 0:
      grads = dp.noised_mean(grads, jax.tree.leaves(batch)[0].shape[0],
                             dp.noise_key(seed, state.step), dp_noise * dp_clip)
      extra = {"dp_clipped_fraction": out[2] / weight}
    else:
      grads = jax.tree.map(lambda g: g / weight, grads)
    if frozen:
      grads = lora.fill(state.params, grads)    # zeros where frozen: `tx` drops them
    if bad_steps.is_guarded(state.opt_state):
      value = jnp.zeros((), jnp.float32) if dp_clip > 0 else loss
      updates, opt_state = tx.update(grads, state.opt_state, state.params, value=value)
    else:
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(params),
        "learning_rate": lr_schedule(state.step),
        **bad_steps.step_metrics(opt_state),
        **extra,
    }
    metrics.update({f"sum/{k}": v for k, v in aux.items()})   # the objective summarizes these
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

  batch_sh = sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, sharding.replicated(mesh)), donate_argnums=(0,))


def make_eval_step(model, loss_fn: Callable, mesh, params_sh, *, microbatches: int = 1) -> Callable:
  """(params, batch) -> summed loss pieces (loss_sum, weight, ...), replicated.

  With k microbatches the batch is split as in the train step and the sums accumulate over a
  scan, so that eval holds one microbatch's activations, as training does."""
  def sums(params, batch):
    loss_sum, aux = loss_fn(model, params, batch, deterministic=True, rngs=None)
    return {"loss_sum": loss_sum, **aux}

  def step(params, batch):
    if microbatches == 1:
      return sums(params, batch)
    return accumulate.scan_sum(lambda mb: sums(params, mb), _split_microbatches(batch, microbatches))

  return jax.jit(step, in_shardings=(params_sh, sharding.batch_sharding(mesh)),
                 out_shardings=sharding.replicated(mesh))
