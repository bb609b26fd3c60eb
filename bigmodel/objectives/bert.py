"""BERT pretraining: masked LM at the gathered masked positions plus next-sentence prediction.

loss = mlm_loss + nsp_loss, as google-research/bert's `run_pretraining.py`:
  mlm_loss  sum over masked positions of weight * CE / sum of weights
  nsp_loss  mean over sequences of the 2-way CE (0: B follows A, 1: B is random)

Losses are sum-reduced for the train step, which divides by the aux `weight` (here the
number of masked positions, W). The NSP sum is scaled by W / (number of sequences), so
that loss_sum / W = mlm_loss + nsp_loss exactly for one batch; with gradient
accumulation each microbatch's NSP mean is weighted by its share of masked positions.

Metrics (summarize): mlm_loss, mlm_accuracy (over masked positions), nsp_loss,
nsp_accuracy and loss (their sum).
"""

from __future__ import annotations

import dataclasses

import gin
import jax.numpy as jnp
import optax

from bigmodel.objectives.lm import softmax_xent


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MlmConfig:
  """Masked LM + next-sentence pairs (objective `bert_mlm_nsp`), as google-research/bert's
  create_pretraining_data.py (its flag names in brackets). See bigmodel/data/bert.py."""
  mlm_probability: float = 0.15     # [masked_lm_prob]
  mlm_max_predictions: int = 0      # [max_predictions_per_seq]; 0: 15% of seq_len rounded up to 4 (20 at 128, 80 at 512)
  mlm_whole_word: bool = False      # [do_whole_word_mask]: mask all pieces of a word together
  mlm_masking: str = "static"       # static: masks drawn once per copy | dynamic: redrawn at every visit
  dupe_factor: int = 10             # [dupe_factor]: passes over the documents, each with fresh pairs (and masks)
  short_seq_prob: float = 0.1       # [short_seq_prob]: a document's pairs target a random shorter length


def model_args(batch):
  return (batch["input_ids"], batch["segment_ids"], batch["input_mask"],
          batch["masked_lm_positions"])


def example_batch(batch_size: int, seq_len: int) -> dict:
  """Shapes of real batches. The prediction width is the default for seq_len
  (`MlmConfig.mlm_max_predictions = 0`); a run that sets another width only traces its
  train step at that width (params do not depend on it)."""
  from bigmodel.data import bert as bert_data   # the pipeline (TensorFlow) only when used
  p = bert_data.prediction_slots(seq_len)
  z = jnp.zeros((batch_size, seq_len), jnp.int32)
  zp = jnp.zeros((batch_size, p), jnp.int32)
  return {"input_ids": z, "input_mask": z + 1, "segment_ids": z,
          "masked_lm_positions": zp, "masked_lm_ids": zp,
          "masked_lm_weights": jnp.ones((batch_size, p), jnp.float32),
          "next_sentence_labels": jnp.zeros((batch_size,), jnp.int32),
          "next_sentence_weights": jnp.ones((batch_size,), jnp.float32)}


def output_fraction(cfg) -> float:
  """The MLM head runs at the gathered prediction slots only (bigmodel.flops)."""
  from bigmodel.data import bert as bert_data
  return (cfg.mlm_max_predictions or bert_data.prediction_slots(cfg.seq_len, cfg.mlm_probability)) \
      / cfg.seq_len


def build_data(cfg, tokenizer=None):
  from bigmodel.data import bert as bert_data
  return bert_data.BertData.build(cfg, tokenizer)


def _check_batch(batch) -> None:
  from bigmodel.data import bert as bert_data
  missing = [k for k in bert_data.KEYS if k not in batch]
  if missing:
    raise ValueError(f"a bert_mlm_nsp batch needs {list(bert_data.KEYS)}; missing {missing}")
  pos, ids = batch["masked_lm_positions"], batch["masked_lm_ids"]
  if pos.shape != ids.shape or pos.shape != batch["masked_lm_weights"].shape:
    raise ValueError(f"masked_lm_positions {pos.shape}, masked_lm_ids {ids.shape} and "
                     f"masked_lm_weights {batch['masked_lm_weights'].shape} must have one shape [b, p]")


def mlm_nsp_loss(model, params, batch, *, deterministic=True, rngs=None):
  """(loss_sum, aux sums) for one (micro)batch; the step divides by aux["weight"]."""
  _check_batch(batch)
  out = model.apply({"params": params}, *model_args(batch), deterministic=deterministic, rngs=rngs)
  logits = out["mlm_logits"].astype(jnp.float32)                      # [b, p, v]
  ids = batch["masked_lm_ids"]
  w = batch["masked_lm_weights"].astype(jnp.float32)
  ce, hits = softmax_xent(logits, ids)
  mlm_sum = jnp.sum(ce * w)
  weight = jnp.sum(w)
  mlm_correct = jnp.sum(hits * w)

  nsp_logits = out["nsp_logits"].astype(jnp.float32)                  # [b, 2]
  labels = batch["next_sentence_labels"]
  nw = batch["next_sentence_weights"].astype(jnp.float32)
  nsp_ce = optax.softmax_cross_entropy_with_integer_labels(nsp_logits, labels)
  nsp_sum = jnp.sum(nsp_ce * nw)
  nsp_count = jnp.sum(nw)
  nsp_correct = jnp.sum((jnp.argmax(nsp_logits, -1) == labels).astype(jnp.float32) * nw)

  # loss_sum / max(W, 1) == mlm mean + nsp mean
  loss_sum = mlm_sum + nsp_sum * jnp.maximum(weight, 1.0) / jnp.maximum(nsp_count, 1.0)
  return loss_sum, {"weight": weight, "mlm_loss_sum": mlm_sum, "mlm_correct": mlm_correct,
                    "nsp_loss_sum": nsp_sum, "nsp_correct": nsp_correct, "nsp_count": nsp_count}


def summarize(sums: dict) -> dict:
  weight = max(float(sums["weight"]), 1.0)
  count = max(float(sums["nsp_count"]), 1.0)
  out = {"mlm_loss": float(sums["mlm_loss_sum"]) / weight,
         "mlm_accuracy": float(sums["mlm_correct"]) / weight,
         "nsp_loss": float(sums["nsp_loss_sum"]) / count,
         "nsp_accuracy": float(sums["nsp_correct"]) / count}
  out["loss"] = out["mlm_loss"] + out["nsp_loss"]
  return out
