"""Sequential recommendation over item ids (pipeline: bigmodel/data/recsys.py).

  sasrec    a causal decoder (`models.Decoder`, learned positions, output tied to the item
            embedding): next-item cross entropy at every position, full softmax over the
            catalogue (no sampled negatives: Klenitskiy & Vasilev 2023)
  bert4rec  a bidirectional encoder (`models.recsys.ItemEncoder`: the BERT trunk and its MLM
            head, tied to the item embedding): the Cloze task, cross entropy at the masked
            positions (RecsysConfig.mask_probability of each row's items); at inference a
            mask is appended after the history and its prediction ranks the catalogue

Training batches give the loss (and `accuracy`, the share of targets ranked first).
Evaluation batches (keys `target`, `exclude`) rank the whole catalogue for each user's
held-out item at the last position, with the user's already-seen items left out (the
target itself never is), and sum HR@K, NDCG@K (K = RecsysConfig.cutoff, 10) and the
reciprocal rank; `loss` is the cross entropy of the target there. Ties rank by item id
(the order of `jax.lax.top_k`), so a constant scorer gets no credit from them.

The catalogue is the vocabulary axis: the item embedding is [vocab, embed] and the logits
[batch, (len,) vocab] carry the logical axis `act_vocab`, which shards over `tensor`
(sharding.RULES), so a large catalogue splits across the tensor axis.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from bigmodel.data import recsys as rec_data
from bigmodel.objectives.lm import cross_entropy
from bigmodel.sharding import constrain

RecsysConfig = rec_data.RecsysConfig   # the task section (registered with the objectives)

BV = ("act_batch", "act_vocab")


# ----------------------------------------------------------------------------- ranking


def ranks(scores, target, exclude, num_ids):
  """0-based rank of each target among the ranked items, int32 [b].

  scores [b, v]; target [b]; exclude [b, h] ids of seen items (PAD: none); num_ids [b] the
  catalogue's id count (ids >= it, and the pad and mask ids, are not items). An item ranks
  ahead of the target when it scores higher, or the same with a smaller id."""
  b, v = scores.shape
  ids = jnp.arange(v, dtype=jnp.int32)[None, :]
  rows = jnp.arange(b)[:, None]
  seen = jnp.zeros((b, v), bool).at[rows, exclude].set(True)
  target = target.astype(jnp.int32)[:, None]
  out = seen | (ids < rec_data.FIRST_ITEM) | (ids >= num_ids[:, None])
  out = out & (ids != target)
  t = jnp.take_along_axis(scores, target, axis=1)
  ahead = ((scores > t) | ((scores == t) & (ids < target))) & ~out
  return jnp.sum(ahead, axis=1, dtype=jnp.int32)


def rank_metrics(rank, weights, cutoff: int) -> dict:
  """Weighted sums of HR@cutoff, NDCG@cutoff and the reciprocal rank, and the weight."""
  w = weights.astype(jnp.float32)
  r = rank.astype(jnp.float32)
  hit = (rank < cutoff).astype(jnp.float32)
  return {"weight": jnp.sum(w), "hr_sum": jnp.sum(hit * w),
          "ndcg_sum": jnp.sum(hit / jnp.log2(r + 2.0) * w),
          "rr_sum": jnp.sum(w / (r + 1.0))}


def _ranking(logits, batch, model):
  """(target cross-entropy sum, ranking sums) of an evaluation batch's [b, v] scores."""
  logits = constrain(logits.astype(jnp.float32), BV, getattr(model, "mesh", None))
  cutoff = rec_data.RecsysConfig().cutoff
  valid = jnp.arange(logits.shape[1])[None, :] < batch["num_ids"][:, None]
  valid = valid & (jnp.arange(logits.shape[1])[None, :] >= rec_data.FIRST_ITEM)
  masked = jnp.where(valid, logits, -1e9)
  loss = jax.nn.logsumexp(masked, axis=1) - jnp.take_along_axis(
      masked, batch["target"][:, None].astype(jnp.int32), axis=1)[:, 0]
  rank = ranks(logits, batch["target"], batch["exclude"], batch["num_ids"])
  w = batch["weights"].astype(jnp.float32)
  return jnp.sum(loss * w), rank_metrics(rank, w, cutoff)


def is_eval_batch(batch) -> bool:
  return "target" in batch


def summarize(sums: dict, cutoff: int = 0) -> dict:
  """Sums -> loss, accuracy (training) or loss, hr_K, ndcg_K, mrr (evaluation); K is the cutoff
  the sums were taken at (default RecsysConfig.cutoff)."""
  weight = max(float(sums["weight"]), 1.0)
  out = {}
  if "loss_sum" in sums:
    out["loss"] = float(sums["loss_sum"]) / weight
  if "hr_sum" in sums:
    k = cutoff or rec_data.RecsysConfig().cutoff
    out.update({f"hr_{k}": float(sums["hr_sum"]) / weight,
                f"ndcg_{k}": float(sums["ndcg_sum"]) / weight,
                "mrr": float(sums["rr_sum"]) / weight})
  if "correct" in sums:
    out["accuracy"] = float(sums["correct"]) / weight
  return out


# ----------------------------------------------------------------------------- sasrec


def _segments(inputs):
  return (inputs != rec_data.PAD).astype(jnp.int32)


def sasrec_model_args(batch):
  return batch["inputs"], None, _segments(batch["inputs"])


def sasrec_example_batch(batch_size: int, seq_len: int) -> dict:
  z = jnp.zeros((batch_size, seq_len), jnp.int32) + rec_data.FIRST_ITEM
  return {"inputs": z, "targets": z, "weights": jnp.ones((batch_size, seq_len), jnp.float32)}


def sasrec_scores(model, params, inputs):
  """[b, v] scores of the next item after each row's last position (right-aligned rows)."""
  hidden = model.apply({"params": params}, inputs, None, _segments(inputs), deterministic=True,
                       return_hidden=True)
  table = params["embed"]["embedding"]
  return jnp.einsum("bd,vd->bv", hidden[:, -1], table.astype(hidden.dtype))


def sasrec_loss(model, params, batch, *, deterministic=True, rngs=None):
  if is_eval_batch(batch):
    return _ranking(sasrec_scores(model, params, batch["inputs"]), batch, model)
  logits = model.apply({"params": params}, *sasrec_model_args(batch), deterministic=deterministic,
                       rngs=rngs)
  loss_sum, weight, correct = cross_entropy(logits, batch["targets"], batch["weights"])
  return loss_sum, {"weight": weight, "correct": correct}


def build_sasrec_data(cfg, tokenizer=None):
  return rec_data.RecsysData.build(cfg, tokenizer, cloze=False)


# ----------------------------------------------------------------------------- bert4rec


def _encoder_args(inputs, positions):
  return inputs, jnp.zeros_like(inputs), _segments(inputs), positions


def bert4rec_model_args(batch):
  return _encoder_args(batch["inputs"], batch["positions"])


def bert4rec_example_batch(batch_size: int, seq_len: int) -> dict:
  p = rec_data.cloze_slots(seq_len, rec_data.RecsysConfig().mask_probability)
  z = jnp.zeros((batch_size, seq_len), jnp.int32) + rec_data.FIRST_ITEM
  zp = jnp.zeros((batch_size, p), jnp.int32)
  return {"inputs": z, "positions": zp, "targets": zp + rec_data.FIRST_ITEM,
          "weights": jnp.ones((batch_size, p), jnp.float32)}


def bert4rec_output_fraction(cfg) -> float:
  return rec_data.cloze_slots(cfg.seq_len, rec_data.RecsysConfig().mask_probability) / cfg.seq_len


def bert4rec_scores(model, params, inputs):
  """[b, v] scores at the last position (the appended mask) of right-aligned rows."""
  last = jnp.full((inputs.shape[0], 1), inputs.shape[1] - 1, jnp.int32)
  out = model.apply({"params": params}, *_encoder_args(inputs, last), deterministic=True)
  return out["mlm_logits"][:, 0]


def bert4rec_loss(model, params, batch, *, deterministic=True, rngs=None):
  if is_eval_batch(batch):
    return _ranking(bert4rec_scores(model, params, batch["inputs"]), batch, model)
  out = model.apply({"params": params}, *bert4rec_model_args(batch), deterministic=deterministic,
                    rngs=rngs)
  loss_sum, weight, correct = cross_entropy(out["mlm_logits"], batch["targets"], batch["weights"])
  return loss_sum, {"weight": weight, "correct": correct}


def build_bert4rec_data(cfg, tokenizer=None):
  return rec_data.RecsysData.build(cfg, tokenizer, cloze=True)


SCORERS = {"sasrec": sasrec_scores, "bert4rec": bert4rec_scores}
