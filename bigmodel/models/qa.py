"""Extractive QA head on the shared encoder (objective `qa`).

    logits = EncoderSpanExtractor(cfg).apply({"params": p}, input_ids, segment_ids, input_mask)
    logits  float32 [b, s, 2]   [..., 0] start logits, [..., 1] end logits, per token

`EncoderSpanExtractor` *is* the bare BERT trunk (`Encoder` with heads=()) plus one dense layer
`qa_outputs/{kernel [d, 2], bias [2]}` on every last hidden state, as Hugging Face
`BertForQuestionAnswering` (`bert.*` + `qa_outputs`) and google-research/bert run_squad.py
(`cls/squad/output_weights`): a trunk checkpoint initializes it directly
(`TrainConfig.init_checkpoint`; `qa_outputs` starts fresh, see `heads.FRESH_PARAMS`).
Dropout (ModelConfig.dropout) acts inside the trunk only, as in BERT. Padding positions are
not masked here; the loss and the decoder (bigmodel.evaluation.qa) use input_mask.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import linen as nn

from bigmodel.models.encoder import Dense, Encoder
from bigmodel.sharding import constrain


class EncoderSpanExtractor(Encoder):
  heads: Sequence[str] = ()

  @nn.compact
  def __call__(self, input_ids, segment_ids=None, input_mask=None, deterministic: bool = True):
    if input_mask is None:
      input_mask = jnp.ones_like(input_ids)
    out = super().__call__(input_ids, segment_ids, input_mask, None, deterministic)
    logits = Dense(2, self.cfg, axes=("embed", "classes"), name="qa_outputs")(out["hidden"])
    return constrain(logits.astype(jnp.float32), ("act_batch", "act_len", None), self.mesh)
