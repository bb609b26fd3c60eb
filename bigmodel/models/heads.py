"""Task heads on the shared encoder.

    logits = EncoderClassifier(cfg).apply({"params": p}, input_ids, segment_ids, input_mask)
    logits  float32 [b, c]   c = ModelConfig.num_classes

`EncoderClassifier` *is* the bare BERT trunk (`Encoder` with heads=()) plus one dense layer
`classifier/{kernel [d, c], bias [c]}` on a pooled summary, so its param tree is the
pretraining (or imported) tree minus `mlm`/`nsp`, plus `classifier`: a checkpoint of the
trunk initializes it directly (`TrainConfig.init_checkpoint`; `classifier` starts fresh).
This is also the layout of Hugging Face `BertForSequenceClassification` (`bert.*` +
`classifier`).

Pooling (`ModelConfig.pooling`):
  cls   the pooler's tanh(dense(hidden[:, 0])), as BERT fine-tuning (google-research/bert)
  mean  the mean of the last hidden states over real tokens (input_mask), as
        sentence-transformers (all-MiniLM-L6-v2 was trained with mean pooling)
Dropout (ModelConfig.dropout) applies to the pooled vector in training, as in BERT.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import linen as nn

from bigmodel.models.encoder import Dense, Encoder
from bigmodel.sharding import constrain

POOLINGS = ("cls", "mean")
FRESH_PARAMS = ("classifier",)   # top-level params that a trunk checkpoint lacks: start fresh


class EncoderClassifier(Encoder):
  heads: Sequence[str] = ()

  @nn.compact
  def __call__(self, input_ids, segment_ids=None, input_mask=None, deterministic: bool = True):
    cfg = self.cfg
    if cfg.num_classes < 1:
      raise ValueError("EncoderClassifier needs ModelConfig.num_classes >= 1 (the label count)")
    if cfg.pooling not in POOLINGS:
      raise ValueError(f"ModelConfig.pooling={cfg.pooling!r}: expected one of {POOLINGS}")
    if input_mask is None:
      input_mask = jnp.ones_like(input_ids)
    out = super().__call__(input_ids, segment_ids, input_mask, None, deterministic)
    if cfg.pooling == "cls":
      pooled = out["pooled"]
    else:
      m = input_mask.astype(out["hidden"].dtype)[..., None]
      pooled = jnp.sum(out["hidden"] * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    if cfg.dropout > 0:
      pooled = nn.Dropout(cfg.dropout)(pooled, deterministic=deterministic)
    logits = Dense(cfg.num_classes, cfg, axes=("embed", "classes"), name="classifier")(pooled)
    return constrain(logits.astype(jnp.float32), ("act_batch", None), self.mesh)
