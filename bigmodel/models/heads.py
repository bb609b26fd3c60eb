"""Task heads on the shared encoder and decoder.

    logits = EncoderClassifier(cfg).apply({"params": p}, input_ids, segment_ids, input_mask)
    logits  float32 [b, c]   c = num_classes (ClassificationConfig.num_classes)

`EncoderClassifier` *is* the bare BERT trunk (`Encoder` with heads=()) plus one dense layer
`classifier/{kernel [d, c], bias [c]}` on a pooled summary, so its param tree is the
pretraining (or imported) tree minus `mlm`/`nsp`, plus `classifier`: a checkpoint of the
trunk initializes it directly (`TrainConfig.init_checkpoint`; `classifier` starts fresh).
This is also the layout of Hugging Face `BertForSequenceClassification` (`bert.*` +
`classifier`).

Pooling (`pooling`, ClassificationConfig.pooling):
  cls   the pooler's tanh(dense(hidden[:, 0])), as BERT fine-tuning (google-research/bert)
  mean  the mean of the last hidden states over real tokens (input_mask), as
        sentence-transformers (all-MiniLM-L6-v2 was trained with mean pooling)
Dropout (ModelConfig.dropout) applies to the pooled vector in training, as in BERT.

`DecoderClassifier` is the GPT decoder (`Decoder`; the same param tree, so a `bigmodel train`
or imported GPT-2 checkpoint initializes it) with the same `classifier` dense layer on the
final hidden state of the last real token: causal attention means only that position has
seen the whole input (as Hugging Face GPT2ForSequenceClassification). Same call signature
as EncoderClassifier; segment_ids are ignored (a pair is one sequence, joined by EOS), and
input_mask marks the real tokens, which must be left-aligned.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
from flax import linen as nn

from bigmodel.models.decoder import Decoder
from bigmodel.models.encoder import Dense, Encoder
from bigmodel.sharding import constrain

POOLINGS = ("cls", "mean")
FRESH_PARAMS = ("classifier", "qa_outputs", "tagger")   # top-level params that a trunk checkpoint lacks: start fresh


class EncoderClassifier(Encoder):
  heads: Sequence[str] = ()
  num_classes: int = 0             # ClassificationConfig.num_classes
  pooling: str = "cls"             # ClassificationConfig.pooling

  @nn.compact
  def __call__(self, input_ids, segment_ids=None, input_mask=None, deterministic: bool = True):
    cfg = self.cfg
    if self.num_classes < 1:
      raise ValueError("EncoderClassifier needs num_classes >= 1 (ClassificationConfig.num_classes: "
                       "the label count)")
    if self.pooling not in POOLINGS:
      raise ValueError(f"ClassificationConfig.pooling={self.pooling!r}: expected one of {POOLINGS}")
    if input_mask is None:
      input_mask = jnp.ones_like(input_ids)
    out = super().__call__(input_ids, segment_ids, input_mask, None, deterministic)
    if self.pooling == "cls":
      pooled = out["pooled"]
    else:
      m = input_mask.astype(out["hidden"].dtype)[..., None]
      pooled = jnp.sum(out["hidden"] * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    if cfg.dropout > 0:
      pooled = nn.Dropout(cfg.dropout)(pooled, deterministic=deterministic)
    logits = Dense(self.num_classes, cfg, axes=("embed", "classes"), name="classifier")(pooled)
    return constrain(logits.astype(jnp.float32), ("act_batch", None), self.mesh)


class DecoderClassifier(Decoder):
  num_classes: int = 0             # ClassificationConfig.num_classes

  @nn.compact
  def __call__(self, input_ids, segment_ids=None, input_mask=None, deterministic: bool = True):
    cfg = self.cfg
    if self.num_classes < 1:
      raise ValueError("DecoderClassifier needs num_classes >= 1 (ClassificationConfig.num_classes: "
                       "the label count)")
    if input_mask is None:
      input_mask = jnp.ones_like(input_ids)
    positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
    hidden = super().__call__(input_ids, positions, input_mask.astype(jnp.int32), deterministic,
                              return_hidden=True)                              # [b, s, d]
    last = jnp.maximum(jnp.sum(input_mask, axis=1) - 1, 0)                    # [b]
    pooled = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]   # [b, d]
    if cfg.dropout > 0:
      pooled = nn.Dropout(cfg.dropout)(pooled, deterministic=deterministic)
    logits = Dense(self.num_classes, cfg, axes=("embed", "classes"), name="classifier")(pooled)
    return constrain(logits.astype(jnp.float32), ("act_batch", None), self.mesh)
