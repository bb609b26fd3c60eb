"""GPT-style decoder: token (+ learned position) embeddings, pre-norm blocks, tied LM head.

A pure function of params and inputs: `Decoder(cfg).apply({"params": p}, tokens, ...)`
returns logits [b, s, v]; the loss lives in `bigmodel.objectives`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from bigmodel.config import ModelConfig
from bigmodel.models.layers import (BSD, BSV, BlockStack, Embed, Norm, attention_mask, dtype_of,
                                    normal, param_with_axes)
from bigmodel.sharding import constrain


class Decoder(nn.Module):
  cfg: ModelConfig
  mesh: Mesh | None = None

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, deterministic: bool = True,
               return_hidden: bool = False):
    """tokens, positions, segment_ids: int [b, s]. segment 0 marks padding.

    Returns logits float32 [b, s, v]; with return_hidden, the final-norm hidden states
    [b, s, d] instead (task heads on the decoder; the LM head is then not applied)."""
    cfg = self.cfg
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    embed = Embed(cfg.vocab_size, cfg, name="embed")
    x = embed(tokens)
    if cfg.positions == "learned":
      pos = Embed(cfg.max_len, cfg, axes=("pos", "embed"), name="pos_embed")
      x = x + pos(positions)
    if cfg.dropout > 0:
      x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    x = constrain(x, BSD, self.mesh)
    mask = attention_mask(segment_ids, segment_ids, causal=True)
    x = BlockStack(cfg, self.mesh, deterministic, name="blocks")(x, mask, positions)
    x = Norm(cfg, name="final_norm")(x)
    if return_hidden:
      return constrain(x, BSD, self.mesh)
    if cfg.tie_embeddings:
      logits = embed.attend(x)
    else:
      w = self.param("lm_head", param_with_axes(normal(cfg.init_std), ("embed", "vocab")),
                     (cfg.d_model, cfg.vocab_size), dtype_of(cfg.param_dtype))
      logits = jnp.einsum("bsd,dv->bsv", x, w.astype(dtype_of(cfg.dtype)))
    return constrain(logits.astype(jnp.float32), BSV, self.mesh)
