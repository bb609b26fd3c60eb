"""Sequence classification: cross-entropy on a pooled summary, single sentences or pairs.
  objective `classification`          an encoder (`models.heads.EncoderClassifier`)
  objective `decoder_classification`  a GPT decoder, read at its last real token
                                      (`models.heads.DecoderClassifier`)

Losses are sum-reduced; aux `weight` counts the real rows (padding rows of a last eval batch
weigh 0). Metrics (summarize): loss, accuracy. Macro-F1 needs every prediction: `bigmodel
evaluate` computes it (bigmodel.evaluation.tasks).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from bigmodel.data import finetune as ft_data


def model_args(batch):
  return (batch["input_ids"], batch["segment_ids"], batch["input_mask"])


def example_batch(batch_size: int, seq_len: int) -> dict:
  z = jnp.zeros((batch_size, seq_len), jnp.int32)
  return {"input_ids": z, "input_mask": z + 1, "segment_ids": z,
          "labels": jnp.zeros((batch_size,), jnp.int32),
          "weights": jnp.ones((batch_size,), jnp.float32)}


def build_data(cfg, tokenizer=None) -> ft_data.ClassificationData:
  return ft_data.ClassificationData.build(cfg, tokenizer)


def build_decoder_data(cfg, tokenizer=None) -> ft_data.ClassificationData:
  return ft_data.ClassificationData.build(cfg, tokenizer, decoder=True)


def classification_loss(model, params, batch, *, deterministic=True, rngs=None):
  missing = [k for k in ft_data.KEYS if k not in batch]
  if missing:
    raise ValueError(f"a classification batch needs {list(ft_data.KEYS)}; missing {missing}")
  logits = model.apply({"params": params}, *model_args(batch), deterministic=deterministic,
                       rngs=rngs).astype(jnp.float32)                  # [b, c]
  return weighted_xent(logits, batch["labels"], batch["weights"])


def weighted_xent(logits, labels, weights):
  """(sum of weighted cross entropies, {"weight", "correct"} sums) for integer labels over
  the last axis of logits; shared by sequence and token classification."""
  w = weights.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  correct = jnp.sum((jnp.argmax(logits, -1) == labels).astype(jnp.float32) * w)
  return jnp.sum(ce * w), {"weight": jnp.sum(w), "correct": correct}


def summarize(sums: dict) -> dict:
  weight = max(float(sums["weight"]), 1.0)
  out = {"accuracy": float(sums["correct"]) / weight}
  if "loss_sum" in sums:
    out["loss"] = float(sums["loss_sum"]) / weight
  return out
