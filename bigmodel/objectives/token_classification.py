"""Token classification / NER (objective `token_classification`): per-token cross-entropy
on `bigmodel.models.tagger.EncoderTagger`, counted only at each word's first sub-word.

Batch (bigmodel.data.ner): input_ids, input_mask, segment_ids, labels int32 [b, s];
label_weights float32 [b, s] (1 on first sub-words of real sentences, 0 on later sub-words,
[CLS]/[SEP], padding and the padding rows of a last eval batch).

Losses are sum-reduced; aux `weight` counts the labeled tokens, so the train step's loss
is the mean over words. Metrics (summarize): loss, accuracy (over labeled first sub-words).
Entity-level F1 needs whole sentences: `bigmodel evaluate` computes it
(bigmodel.evaluation.ner).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import gin
import jax.numpy as jnp

from bigmodel.objectives.classification import weighted_xent


@gin.configurable
@dataclasses.dataclass(frozen=True)
class NerConfig:
  """Token classification (objective `token_classification`; see bigmodel/data/ner.py):
  DataConfig.files / val_files are CoNLL column files; with no files, DataConfig.tfds_name
  (e.g. 'conll2003') is read instead."""
  num_classes: int = 0              # the tagger's width: the tag count (NUM_TAGS)
  labels: Sequence[str] = ()        # the tag set in id order (default: inferred from the train file)
  token_column: int = 0             # CoNLL: the word column (0-based; -1 is the last)
  tag_column: int = -1              # CoNLL: the tag column (0-based; -1 is the last)
  ner_tag_scheme: str = "iob2"      # iob2 (BIO): tags as they are | iob1: converted to IOB2 on reading
  ner_eval_seq_len: int = 0         # evaluation/prediction row length (0: seq_len)
  ner_length_buckets: Sequence[int] = ()  # training: batches of similar-length sentences, each cut
                                    # to the smallest of these lengths that holds it (() : seq_len)
  ner_input_format: str = "auto"    # predict --input: auto | conll | text (one sentence a line)
  ner_tfds_tokens_key: str = "tokens"  # TFDS: the words feature
  ner_tfds_tags_key: str = "ner"    # TFDS: the tag feature (a sequence of ClassLabel)
  ner_tfds_eval_split: str = "dev"  # TFDS: the evaluation split (conll2003: dev; others: validation)


def head_args(task: NerConfig) -> dict:
  return {"num_classes": task.num_classes}


def model_args(batch):
  return (batch["input_ids"], batch["segment_ids"], batch["input_mask"])


def example_batch(batch_size: int, seq_len: int) -> dict:
  z = jnp.zeros((batch_size, seq_len), jnp.int32)
  return {"input_ids": z, "input_mask": z + 1, "segment_ids": z, "labels": z,
          "label_weights": jnp.ones((batch_size, seq_len), jnp.float32)}


def build_data(cfg, tokenizer=None):
  from bigmodel.data import ner as ner_data   # the pipeline (TensorFlow) only when used
  return ner_data.NerData.build(cfg, tokenizer)


def token_classification_loss(model, params, batch, *, deterministic=True, rngs=None):
  from bigmodel.data import ner as ner_data
  missing = [k for k in ner_data.KEYS if k not in batch]
  if missing:
    raise ValueError(f"a token-classification batch needs {list(ner_data.KEYS)}; missing {missing}")
  logits = model.apply({"params": params}, *model_args(batch), deterministic=deterministic,
                       rngs=rngs).astype(jnp.float32)                  # [b, s, c]
  return weighted_xent(logits, batch["labels"], batch["label_weights"])
