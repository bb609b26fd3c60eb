"""Causal language modelling: next-token cross entropy over weighted targets."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def model_args(batch):
  return batch["inputs"], batch["positions"], batch["segment_ids"]


def example_batch(batch_size: int, seq_len: int) -> dict:
  z = jnp.zeros((batch_size, seq_len), jnp.int32)
  return {"inputs": z, "targets": z, "positions": z, "segment_ids": z + 1,
          "weights": jnp.ones((batch_size, seq_len), jnp.float32)}


def build_data(cfg, tokenizer=None):
  from bigmodel.data.lm import LMData   # the pipeline (TensorFlow) only when used
  return LMData.build(cfg, tokenizer)


def _max_and_first_argmax(x):
  """(max, index of its first occurrence) over the last axis, in one reduction."""
  index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)

  def pick(a, b):
    (av, ai), (bv, bi) = a, b
    keep_a = (av > bv) | ((av == bv) & (ai < bi))
    return jnp.where(keep_a, av, bv), jnp.where(keep_a, ai, bi)
  init = (jnp.array(-jnp.inf, x.dtype), jnp.array(0, jnp.int32))
  return jax.lax.reduce((x, index), init, pick, (x.ndim - 1,))


def softmax_xent(logits, labels):
  """Per-position cross entropy, and whether the label is the first arg-max (as `argmax`).

  The same loss as `optax.softmax_cross_entropy_with_integer_labels`. A hit is counted when
  the label is the first index that attains the max, exactly `jnp.argmax(logits, -1) ==
  labels`: with ties (constant logits, or logits rounded in bf16) only the first of the
  tied indices scores. The max that the log-sum-exp subtracts and that first arg-max come
  from one reduction over the vocabulary, so accuracy costs no extra read of the [.., V]
  logits (a separate argmax pass did)."""
  logits = logits.astype(jnp.float32)
  peak, first = _max_and_first_argmax(jax.lax.stop_gradient(logits))
  shifted = logits - peak[..., None]
  label = jnp.take_along_axis(shifted, labels[..., None], axis=-1)[..., 0]
  losses = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1)) - label
  return losses, (first == labels).astype(jnp.float32)


def cross_entropy(logits, targets, weights):
  """Returns (sum of weighted token losses, sum of weights, number correct)."""
  losses, hits = softmax_xent(logits, targets)
  weights = weights.astype(jnp.float32)
  return jnp.sum(losses * weights), jnp.sum(weights), jnp.sum(hits * weights)


def causal_lm_loss(model, params, batch, *, deterministic=True, rngs=None):
  """Sum-reduced loss pieces for one (micro)batch; the step normalizes by total weight.

  batch: inputs, targets, positions, segment_ids, weights, each int/float [b, s].
  """
  logits = model.apply({"params": params}, *model_args(batch), deterministic=deterministic,
                       rngs=rngs)
  loss_sum, weight_sum, correct = cross_entropy(logits, batch["targets"], batch["weights"])
  return loss_sum, {"weight": weight_sum, "correct": correct}


def summarize(sums: dict) -> dict:
  """Eval/step sums -> loss, accuracy, perplexity."""
  import math
  weight = max(float(sums["weight"]), 1.0)
  out = {"accuracy": float(sums["correct"]) / weight}
  if "loss_sum" in sums:
    out["loss"] = float(sums["loss_sum"]) / weight
    out["perplexity"] = math.exp(min(out["loss"], 50.0))
  return out
