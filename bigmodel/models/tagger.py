"""Token-classification head on the shared encoder.

    logits = EncoderTagger(cfg).apply({"params": p}, input_ids, segment_ids, input_mask)
    input_ids, segment_ids, input_mask  int [b, s]
    logits  float32 [b, s, c]   c = num_classes (the tag count, NerConfig.num_classes)

`EncoderTagger` *is* the bare BERT trunk (`Encoder` with heads=()) plus dropout
(ModelConfig.dropout, in training) and one dense layer `tagger/{kernel [d, c], bias [c]}`
applied to every position's last hidden state. Its param tree is the pretraining (or
imported) tree minus `mlm`/`nsp`, plus `tagger`: a trunk checkpoint initializes it
directly (`TrainConfig.init_checkpoint`; `tagger` starts fresh, see heads.FRESH_PARAMS).
This is Hugging Face `BertForTokenClassification` (`bert.*` + `classifier`), except that
the unused pooler stays in the tree so that trunk checkpoints load unchanged.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import linen as nn

from bigmodel.models.encoder import Dense, Encoder
from bigmodel.sharding import constrain


class EncoderTagger(Encoder):
  heads: Sequence[str] = ()
  num_classes: int = 0             # the tag count (NerConfig.num_classes)

  @nn.compact
  def __call__(self, input_ids, segment_ids=None, input_mask=None, deterministic: bool = True):
    cfg = self.cfg
    if self.num_classes < 1:
      raise ValueError("EncoderTagger needs num_classes >= 1 (NerConfig.num_classes: the tag count)")
    if input_mask is None:
      input_mask = jnp.ones_like(input_ids)
    hidden = super().__call__(input_ids, segment_ids, input_mask, None, deterministic)["hidden"]
    if cfg.dropout > 0:
      hidden = nn.Dropout(cfg.dropout)(hidden, deterministic=deterministic)
    logits = Dense(self.num_classes, cfg, axes=("embed", "classes"), name="tagger")(hidden)
    return constrain(logits.astype(jnp.float32), ("act_batch", "act_len", None), self.mesh)
