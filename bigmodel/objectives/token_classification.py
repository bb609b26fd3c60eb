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

import jax.numpy as jnp

from bigmodel.data import ner as ner_data
from bigmodel.objectives.classification import weighted_xent


def model_args(batch):
  return (batch["input_ids"], batch["segment_ids"], batch["input_mask"])


def example_batch(batch_size: int, seq_len: int) -> dict:
  z = jnp.zeros((batch_size, seq_len), jnp.int32)
  return {"input_ids": z, "input_mask": z + 1, "segment_ids": z, "labels": z,
          "label_weights": jnp.ones((batch_size, seq_len), jnp.float32)}


def build_data(cfg, tokenizer=None) -> ner_data.NerData:
  return ner_data.NerData.build(cfg, tokenizer)


def token_classification_loss(model, params, batch, *, deterministic=True, rngs=None):
  missing = [k for k in ner_data.KEYS if k not in batch]
  if missing:
    raise ValueError(f"a token-classification batch needs {list(ner_data.KEYS)}; missing {missing}")
  logits = model.apply({"params": params}, *model_args(batch), deterministic=deterministic,
                       rngs=rngs).astype(jnp.float32)                  # [b, s, c]
  return weighted_xent(logits, batch["labels"], batch["label_weights"])
