"""Sequence classification: cross-entropy on a pooled summary, single sentences or pairs.
  objective `classification`          an encoder (`models.heads.EncoderClassifier`)
  objective `decoder_classification`  a GPT decoder, read at its last real token
                                      (`models.heads.DecoderClassifier`)

Losses are sum-reduced; aux `weight` counts the real rows (padding rows of a last eval batch
weigh 0). Metrics (summarize): loss, accuracy. Macro-F1 needs every prediction: `bigmodel
evaluate` computes it (bigmodel.evaluation.tasks).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import gin
import jax.numpy as jnp
import optax

log = logging.getLogger(__name__)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ClassificationConfig:
  """A task file and its head (objectives `classification`, `decoder_classification`; see
  bigmodel/data/finetune.py): DataConfig.files and val_files name the train and eval file
  (TSV, CSV or JSONL)."""
  text_columns: Sequence[str] = ()  # one column (a sentence) or two (a sentence pair)
  label_column: str = ""
  column_names: Sequence[str] = ()  # the columns of a headerless file (else its first line is the header)
  labels: Sequence[str] = ()        # the label set in id order (default: inferred from the train file)
  num_classes: int = 0              # the head's classes; 0: the label count of the train file
  pooling: str = "cls"              # encoder: cls (the pooler's tanh(dense([CLS]))) | mean (masked mean)


def head_args(task: ClassificationConfig) -> dict:
  """The encoder head's settings (models.heads.EncoderClassifier)."""
  return {"num_classes": task.num_classes, "pooling": task.pooling}


def decoder_head_args(task: ClassificationConfig) -> dict:
  return {"num_classes": task.num_classes}


def resolve(exp):
  """NUM_CLASSES from the labels (LABELS, else the train file's) when it is unset (0); one set
  below that count stops here, before any training, with both numbers."""
  from bigmodel.config import ConfigError
  from bigmodel.data import readers
  from bigmodel.data.sources import DataError
  task, data = exp.task, exp.data
  if task.labels:
    count, where = len(task.labels), f"LABELS (ClassificationConfig.labels) names {len(task.labels)}"
  elif data.files and task.text_columns and task.label_column:
    try:
      path = readers.resolve(data.files[0], data.data_dir)
      _, labels = readers.read_classification(path, task.text_columns, task.label_column,
                                              task.column_names)
    except DataError:
      if task.num_classes:
        return exp          # nothing to check against here; the input pipeline names the problem
      raise
    count = len(readers.LabelSet.infer(labels))
    where = f"the train file {path} has {count} distinct labels in {task.label_column!r}"
  else:
    return exp              # the input pipeline says what is missing
  if not task.num_classes:
    log.info("NUM_CLASSES (ClassificationConfig.num_classes) unset: %d, from the labels", count)
    return dataclasses.replace(exp, task=dataclasses.replace(task, num_classes=count))
  if task.num_classes < count:
    raise ConfigError(f"NUM_CLASSES (ClassificationConfig.num_classes) = {task.num_classes}, but "
                      f"{where}: set NUM_CLASSES = {count}, or leave it unset (0) to take the "
                      f"label count")
  return exp


def model_args(batch):
  return (batch["input_ids"], batch["segment_ids"], batch["input_mask"])


def example_batch(batch_size: int, seq_len: int) -> dict:
  z = jnp.zeros((batch_size, seq_len), jnp.int32)
  return {"input_ids": z, "input_mask": z + 1, "segment_ids": z,
          "labels": jnp.zeros((batch_size,), jnp.int32),
          "weights": jnp.ones((batch_size,), jnp.float32)}


def build_data(cfg, tokenizer=None):
  from bigmodel.data import finetune as ft_data   # the pipeline only when used
  return ft_data.ClassificationData.build(cfg, tokenizer)


def build_decoder_data(cfg, tokenizer=None):
  from bigmodel.data import finetune as ft_data
  return ft_data.ClassificationData.build(cfg, tokenizer, decoder=True)


def classification_loss(model, params, batch, *, deterministic=True, rngs=None):
  from bigmodel.data import finetune as ft_data
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
