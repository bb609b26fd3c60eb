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
  With `ModelConfig.loss_chunk` > 0, the logits exist one chunk at a time (`chunked_cross_entropy`).
  """
  chunk = getattr(model.cfg, "loss_chunk", 0)
  out = model.apply({"params": params}, *model_args(batch), deterministic=deterministic,
                    rngs=rngs, return_hidden=chunk > 0)
  if chunk > 0:
    sums = chunked_cross_entropy(lm_head(model, params), out, batch["targets"], batch["weights"],
                                 chunk)
  else:
    sums = cross_entropy(out, batch["targets"], batch["weights"])
  loss_sum, weight_sum, correct = sums
  return loss_sum, {"weight": weight_sum, "correct": correct}


def lm_head(model, params):
  """hidden [b, s, d] -> float32 logits [b, s, v]: the decoder's own LM head (tied embedding or
  `lm_head`), the same einsum and dtypes, so the logits equal the model's."""
  from bigmodel.models.layers import BSV, dtype_of
  from bigmodel.sharding import constrain
  cfg = model.cfg
  dt = dtype_of(cfg.dtype)
  if cfg.tie_embeddings:
    w, spec = params["embed"]["embedding"], "bsd,vd->bsv"
  else:
    w, spec = params["lm_head"], "bsd,dv->bsv"
  return lambda x: constrain(jnp.einsum(spec, x, w.astype(dt)).astype(jnp.float32), BSV, model.mesh)


def chunked_cross_entropy(head, hidden, targets, weights, chunk: int):
  """`cross_entropy(head(hidden), targets, weights)` with the float32 logits [b, chunk, v] of one
  chunk of `chunk` sequence positions alive at a time (MaxText's vocabulary tiling).

  A `lax.scan` over the chunks (the sequence padded to a multiple of `chunk` with weight 0)
  whose body is rematerialized: the backward pass recomputes each chunk's logits instead of
  keeping them, so neither pass holds [b, s, v]. Each row keeps its batch sharding."""
  b, s, d = hidden.shape
  n = -(-s // chunk)
  pad = n * chunk - s
  if pad:
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets, weights = (jnp.pad(a, ((0, 0), (0, pad))) for a in (targets, weights))
  split = lambda a: jnp.moveaxis(a.reshape(b, n, chunk, *a.shape[2:]), 1, 0)   # n b c ...

  @jax.checkpoint
  def body(carry, xs):
    h, t, w = xs
    losses, hits = softmax_xent(head(h), t)
    w = w.astype(jnp.float32)
    return tuple(c + x for c, x in zip(carry, (jnp.sum(losses * w), jnp.sum(w),
                                               jnp.sum(hits * w)))), None
  zero = jnp.zeros((), jnp.float32)
  sums, _ = jax.lax.scan(body, (zero, zero, zero), (split(hidden), split(targets), split(weights)))
  return sums


def summarize(sums: dict) -> dict:
  """Eval/step sums -> loss, accuracy, perplexity."""
  import math
  weight = max(float(sums["weight"]), 1.0)
  out = {"accuracy": float(sums["correct"]) / weight}
  if "loss_sum" in sums:
    out["loss"] = float(sums["loss_sum"]) / weight
    out["perplexity"] = math.exp(min(out["loss"], 50.0))
  return out
