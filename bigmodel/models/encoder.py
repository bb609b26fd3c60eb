"""BERT-style encoder: token + position + segment embeddings, bidirectional blocks, pooler,
masked-LM and next-sentence heads.

A pure function of params and inputs; the losses live in `bigmodel.objectives.bert`:

    out = Encoder(cfg).apply({"params": p}, input_ids, segment_ids, input_mask, masked_positions)
    out["mlm_logits"]   [b, p, v]  at the gathered `masked_positions` (all s positions if None)
    out["nsp_logits"]   [b, 2]     0: B follows A, 1: B is random (google-research/bert labels)
    out["hidden"]       [b, s, d]  the last layer, for task heads
    out["pooled"]       [b, d]     tanh(dense(hidden[:, 0])), the [CLS] summary

`Encoder(cfg, heads=())` is the bare trunk (embeddings, blocks, pooler) for fine-tuning:
its param tree is the pretraining tree minus `mlm` and `nsp`.

Einsum letters as in `layers`: b batch, s length, p masked positions, d model width,
v vocabulary, c classes.

Post-LN by default, as the original BERT (`ModelConfig.pre_norm = False`): each block is
`LN(x + attn(x))`, `LN(x + mlp(x))`; with `pre_norm = True` the blocks are pre-LN and a
`final_norm` follows the stack. GELU is `ModelConfig.mlp = 'gelu_exact'` (erf) for BERT.

Parameter tree (scanned layers stack on a leading `layers` axis of size L; with
`scan_layers = False` they are `blocks/layer_{i}/...` without it). The Hugging Face
`BertForPreTraining` name of each entry, for checkpoint import/export; HF Linear kernels
are [out, in] (PyTorch) and ours [in, out]:

    embed/embedding                 [v, d]      bert.embeddings.word_embeddings.weight
    pos_embed/embedding             [max_len, d] bert.embeddings.position_embeddings.weight
    type_embed/embedding            [2, d]      bert.embeddings.token_type_embeddings.weight
    embed_norm/{scale,bias}         [d]         bert.embeddings.LayerNorm.{weight,bias}
    blocks/layers/attn/qkv          [L, d, 3, h, k]  encoder.layer.i.attention.self.{query,key,value}.weight
                                                     (n = 0 query, 1 key, 2 value; heads split h x k)
    blocks/layers/attn/qkv_bias     [L, 3, h, k]     ...attention.self.{query,key,value}.bias
    blocks/layers/attn/out          [L, h, k, d]     ...attention.output.dense.weight
    blocks/layers/attn/out_bias     [L, d]           ...attention.output.dense.bias
    blocks/layers/ln1/{scale,bias}  [L, d]           ...attention.output.LayerNorm
    blocks/layers/mlp/wi, wi_bias   [L, d, f], [L, f] ...intermediate.dense
    blocks/layers/mlp/wo, wo_bias   [L, f, d], [L, d] ...output.dense
    blocks/layers/ln2/{scale,bias}  [L, d]           ...output.LayerNorm
    pooler/{kernel,bias}            [d, d], [d] bert.pooler.dense
    mlm/dense/{kernel,bias}         [d, d], [d] cls.predictions.transform.dense
    mlm/norm/{scale,bias}           [d]         cls.predictions.transform.LayerNorm
    mlm/bias                        [v]         cls.predictions.bias (decoder weight = embed, tied)
    nsp/{kernel,bias}               [d, 2], [2] cls.seq_relationship
    final_norm/{scale,bias}         [d]         only with pre_norm = True (no HF counterpart)

The d -> d dense layers of the heads are annotated ("embed", "mlp"): sharded like an MLP
input projection (fsdp on the input, tensor on the output).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from bigmodel.config import ModelConfig
from bigmodel.models.attention import Segments
from bigmodel.models.layers import (BSD, BlockStack, Embed, Norm, dtype_of,
                                    normal, param_with_axes)
from bigmodel.sharding import constrain

BD = ("act_batch", "act_embed")
BPV = ("act_batch", "act_len", "act_vocab")

HEADS = ("mlm", "nsp")


class Dense(nn.Module):
  """y = x @ kernel + bias over the last axis, with declared logical axes."""
  features: int
  cfg: ModelConfig
  axes: tuple[str, str] = ("embed", "mlp")

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    kernel = self.param("kernel", param_with_axes(normal(cfg.init_std), self.axes),
                        (x.shape[-1], self.features), pdt)
    bias = self.param("bias", param_with_axes(nn.initializers.zeros, self.axes[1:]),
                      (self.features,), pdt)
    return jnp.einsum("...d,df->...f", x, kernel.astype(dt)) + bias.astype(dt)


class Encoder(nn.Module):
  cfg: ModelConfig
  mesh: Mesh | None = None
  heads: Sequence[str] = HEADS     # pretraining heads to build: mlm, nsp (() for the bare trunk)

  @nn.compact
  def __call__(self, input_ids, segment_ids=None, input_mask=None, masked_positions=None,
               deterministic: bool = True):
    """input_ids, segment_ids (token types 0/1), input_mask (1 real, 0 padding): int [b, s];
    masked_positions: int [b, p], the positions to predict (None: all)."""
    cfg = self.cfg
    unknown = set(self.heads) - set(HEADS)
    if unknown:
      raise ValueError(f"Encoder heads {sorted(unknown)} unknown; choose from {HEADS}")
    if cfg.positions != "learned":
      raise ValueError(f"the encoder uses learned positions (BERT); ModelConfig.positions="
                       f"{cfg.positions!r} is not supported")
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length]; got shape {input_ids.shape}")
    b, s = input_ids.shape
    if s > cfg.max_len:
      raise ValueError(f"sequence length {s} exceeds ModelConfig.max_len={cfg.max_len} "
                       f"(the position table); raise max_len or shorten DataConfig.seq_len")
    if segment_ids is None:
      segment_ids = jnp.zeros_like(input_ids)
    if input_mask is None:
      input_mask = jnp.ones_like(input_ids)
    positions = jnp.broadcast_to(jnp.arange(s), (b, s))

    # Embeddings: token + position + segment, then LayerNorm and dropout.
    embed = Embed(cfg.vocab_size, cfg, name="embed")
    x = embed(input_ids)
    x = x + Embed(cfg.max_len, cfg, axes=("pos", "embed"), name="pos_embed")(positions)
    x = x + Embed(cfg.type_vocab_size, cfg, axes=("classes", "embed"), name="type_embed")(segment_ids)
    x = Norm(cfg, name="embed_norm")(x)
    if cfg.dropout > 0:
      x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    x = constrain(x, BSD, self.mesh)

    # Bidirectional blocks; padding keys are masked out.
    mask = Segments(input_mask, input_mask, causal=False)
    x = BlockStack(cfg, self.mesh, deterministic, name="blocks")(x, mask, positions)
    if cfg.pre_norm:
      x = Norm(cfg, name="final_norm")(x)
    out = {"hidden": x}

    pooled = jnp.tanh(constrain(Dense(cfg.d_model, cfg, name="pooler")(x[:, 0]), BD, self.mesh))
    out["pooled"] = pooled

    if "mlm" in self.heads:
      h = x
      if masked_positions is not None:
        h = jnp.take_along_axis(x, masked_positions[..., None].astype(jnp.int32), axis=1,
                                mode="clip")
      h = constrain(h, BSD, self.mesh)
      out["mlm_logits"] = MlmHead(cfg, self.mesh, name="mlm")(h, embed.embedding)
    if "nsp" in self.heads:
      nsp = Dense(2, cfg, axes=("embed", "classes"), name="nsp")(pooled)
      out["nsp_logits"] = constrain(nsp.astype(jnp.float32), ("act_batch", None), self.mesh)
    return out


class MlmHead(nn.Module):
  """dense + GELU + LayerNorm, then logits against the (tied) token embedding plus a bias."""
  cfg: ModelConfig
  mesh: Mesh | None = None

  @nn.compact
  def __call__(self, h, embedding):
    """h [b, p, d]; embedding: the token table [v, d]."""
    cfg = self.cfg
    # Constrained explicitly: left to propagation from the ("embed", "mlp") kernel, XLA's SPMD
    # partitioner gave wrong gradients (right loss) on a data x fsdp x tensor mesh.
    h = constrain(Dense(cfg.d_model, cfg, name="dense")(h), BSD, self.mesh)
    h = jax.nn.gelu(h, approximate=cfg.mlp == "gelu")
    h = Norm(cfg, name="norm")(h)
    logits = jnp.einsum("bpd,vd->bpv", h, embedding.astype(dtype_of(cfg.dtype)))
    bias = self.param("bias", param_with_axes(nn.initializers.zeros, ("vocab",)), (cfg.vocab_size,),
                      dtype_of(cfg.param_dtype))
    logits = logits.astype(jnp.float32) + bias.astype(jnp.float32)
    return constrain(logits, BPV, self.mesh)
