"""Extractive QA (objective `qa`): cross-entropy of the answer's start and end token over the
window's positions (`bigmodel.models.qa.EncoderSpanExtractor`), as run_squad.py: the loss of
a window is (CE(start) + CE(end)) / 2; windows without the answer point both at [CLS].

Padding positions (input_mask 0) are excluded from the softmax. Losses are sum-reduced; aux
`weight` counts the real windows (padding rows of a last eval batch weigh 0). Metrics
(summarize): loss, start_accuracy, end_accuracy, span_accuracy (both right) per window.
EM/F1 over questions need decoding: `bigmodel evaluate` (bigmodel.evaluation.qa).
"""

from __future__ import annotations

import dataclasses

import gin
import jax.numpy as jnp
import optax

NEG = -1e9


@gin.configurable
@dataclasses.dataclass(frozen=True)
class QaConfig:
  """Extractive QA (objective `qa`; see bigmodel/data/qa.py): DataConfig.files / val_files
  are SQuAD v1.1 JSON, or DataConfig.tfds_name ('squad', 'xquad/en') with the splits below."""
  doc_stride: int = 128             # sliding-window step over contexts longer than seq_len
  max_query_len: int = 64           # questions are truncated to this many tokens
  max_answer_len: int = 30          # decoding: the longest answer span, in tokens
  n_best_size: int = 20             # decoding: start/end candidates per window
  train_articles: str = ""          # article range 'START:END' of the train source ('' all)
  eval_articles: str = ""           # ... of the eval source (the train file if val_files is empty)
  tfds_train_split: str = "train"   # TFDS splits of tfds_name (xquad/en has only 'test')
  tfds_eval_split: str = "validation"


def model_args(batch):
  return (batch["input_ids"], batch["segment_ids"], batch["input_mask"])


def example_batch(batch_size: int, seq_len: int) -> dict:
  z = jnp.zeros((batch_size, seq_len), jnp.int32)
  zb = jnp.zeros((batch_size,), jnp.int32)
  return {"input_ids": z, "input_mask": z + 1, "segment_ids": z, "start_positions": zb,
          "end_positions": zb, "weights": jnp.ones((batch_size,), jnp.float32)}


def build_data(cfg, tokenizer=None):
  from bigmodel.data import qa as qa_data   # the pipeline only when used
  return qa_data.QAData.build(cfg, tokenizer)


def span_logits(model, params, batch, *, deterministic=True, rngs=None):
  """(start, end) logits float32 [b, s], padding positions at -1e9."""
  logits = model.apply({"params": params}, *model_args(batch), deterministic=deterministic,
                       rngs=rngs).astype(jnp.float32)                        # [b, s, 2]
  real = batch["input_mask"] > 0
  return jnp.where(real, logits[..., 0], NEG), jnp.where(real, logits[..., 1], NEG)


def qa_loss(model, params, batch, *, deterministic=True, rngs=None):
  from bigmodel.data import qa as qa_data
  missing = [k for k in qa_data.KEYS if k not in batch]
  if missing:
    raise ValueError(f"a QA batch needs {list(qa_data.KEYS)}; missing {missing}")
  start, end = span_logits(model, params, batch, deterministic=deterministic, rngs=rngs)
  sp, ep = batch["start_positions"], batch["end_positions"]
  w = batch["weights"].astype(jnp.float32)
  ce = 0.5 * (optax.softmax_cross_entropy_with_integer_labels(start, sp) +
              optax.softmax_cross_entropy_with_integer_labels(end, ep))
  ok_s = (jnp.argmax(start, -1) == sp).astype(jnp.float32)
  ok_e = (jnp.argmax(end, -1) == ep).astype(jnp.float32)
  return jnp.sum(ce * w), {"weight": jnp.sum(w), "start_correct": jnp.sum(ok_s * w),
                           "end_correct": jnp.sum(ok_e * w), "span_correct": jnp.sum(ok_s * ok_e * w)}


def summarize(sums: dict) -> dict:
  weight = max(float(sums["weight"]), 1.0)
  out = {"start_accuracy": float(sums["start_correct"]) / weight,
         "end_accuracy": float(sums["end_correct"]) / weight,
         "span_accuracy": float(sums["span_correct"]) / weight}
  if "loss_sum" in sums:
    out["loss"] = float(sums["loss_sum"]) / weight
  return out
