"""Causal language modelling: next-token cross entropy over weighted targets."""

from __future__ import annotations

import jax.numpy as jnp
import optax

from bigmodel.data.lm import LMData


def model_args(batch):
  return batch["inputs"], batch["positions"], batch["segment_ids"]


def example_batch(batch_size: int, seq_len: int) -> dict:
  z = jnp.zeros((batch_size, seq_len), jnp.int32)
  return {"inputs": z, "targets": z, "positions": z, "segment_ids": z + 1,
          "weights": jnp.ones((batch_size, seq_len), jnp.float32)}


def build_data(cfg, tokenizer=None) -> LMData:
  return LMData.build(cfg, tokenizer)


def cross_entropy(logits, targets, weights):
  """Returns (sum of weighted token losses, sum of weights, number correct)."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  weights = weights.astype(jnp.float32)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32) * weights
  return jnp.sum(losses * weights), jnp.sum(weights), jnp.sum(correct)


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
