"""GPT-style decoder: token (+ learned position) embeddings, pre-norm blocks, tied LM head.

A pure function of params and inputs: `Decoder(cfg).apply({"params": p}, tokens, ...)`
returns logits [b, s, v]; the loss lives in `bigmodel.objectives`.

Decoding with a KV cache (`decode=True`; `bigmodel.infer.decode` drives it):

    cache = Decoder(cfg).init(rng, zeros[b, t], decode=True)["cache"]    # zeros; t slots a row
    logits, v = model.apply({"params": p, "cache": cache}, prompt [b, s], segment_ids=valid,
                            decode=True, mutable=["cache"])               # prefill
    logits, v = model.apply({"params": p, "cache": v["cache"]}, next [b, 1], ..., decode=True, ...)

The cache holds one `index` [b] (the next free slot of each row) beside each layer's keys and
values. A call's tokens take the positions index .. index + s - 1 (also their cache slots), and
the index then moves by the row's count of tokens with segment id != 0. Rows are therefore
right-padded: a short prompt's padding (segment 0) sits past its end, and the next call
overwrites those slots; a finished row given segment 0 stays where it is.
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from bigmodel.config import ModelConfig
from bigmodel.models.attention import Segments
from bigmodel.models.layers import (BSD, BSV, BlockStack, Embed, Norm, dtype_of,
                                    normal, param_with_axes)
from bigmodel.sharding import constrain


class Decoder(nn.Module):
  cfg: ModelConfig
  mesh: Mesh | None = None

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, deterministic: bool = True,
               return_hidden: bool = False, decode: bool = False):
    """tokens, positions, segment_ids: int [b, s]. segment 0 marks padding.

    Returns logits float32 [b, s, v]; with return_hidden, the final-norm hidden states
    [b, s, d] instead (task heads on the decoder; the LM head is then not applied).
    decode: run on the KV cache (see the module docstring); positions come from it."""
    cfg = self.cfg
    cached = False
    if decode:
      positions, cached = self._cache_positions(tokens, positions, segment_ids)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    embed = Embed(cfg.vocab_size, cfg, name="embed")
    x = embed(tokens)
    if cfg.positions == "learned":
      pos = Embed(cfg.max_len, cfg, axes=("pos", "embed"), name="pos_embed")
      # a finished row may sit at index max_len while decoding: keep its lookup in the table
      x = x + pos(jnp.minimum(positions, cfg.max_len - 1) if cached else positions)
    if cfg.dropout > 0:
      x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    x = constrain(x, BSD, self.mesh)
    # decoding: each Attention masks by cache slot instead
    mask = None if cached else Segments(segment_ids, segment_ids, causal=True)
    x = BlockStack(cfg, self.mesh, deterministic, decode, name="blocks")(x, mask, positions)
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

  def _cache_positions(self, tokens, positions, segment_ids):
    """(positions [b, s], whether the cache already existed); moves the cache index."""
    if positions is not None:
      raise ValueError("Decoder(decode=True) takes positions from its cache index; pass none")
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    b, s = tokens.shape
    ready = self.has_variable("cache", "index")
    index = self.variable("cache", "index", param_with_axes(jnp.zeros, ("act_batch",)), (b,),
                          jnp.int32)
    positions = index.value[:, None] + jnp.arange(s, dtype=jnp.int32)[None, :]
    if ready:
      index.value = index.value + jnp.sum(segment_ids != 0, axis=1, dtype=jnp.int32)
    return positions, ready
