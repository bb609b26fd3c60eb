"""Transformer layers shared by the decoder (GPT) and the encoder (BERT).

Einsum letters, used in every module of this package:
  b batch   s query length   t key length   d model width
  h heads   k head dim       f MLP hidden   v vocabulary   n the 3 of q/k/v (2 of k/v)
  g key/value heads (grouped-query attention)   r query heads per key/value head (h / g)

Each parameter declares its shape, initializer and logical axes once, through
`nn.with_logical_partitioning`; shardings and checkpoints derive from that.
Parameter names are short and stable: checkpoints are keyed on them.

Decoding (`decode=True`, the Flax lm1b/wmt pattern): each Attention keeps its keys and values
in the "cache" collection, `cached_key` / `cached_value` [b, t, g, k] in the compute dtype
(g = ModelConfig.kv_heads: the key/value heads only, h for multi-head)
(stacked on a leading `layers` axis when the layers are scanned), made zero by the first (init)
call at that call's length t. Later calls write their s new keys/values at the cache slots
`positions[:, 0] ..` of each row (the decoder passes its cache index there) and attend to every
slot at or before the query's own; slots past a row's index hold stale or padding entries that
this causal rule never reaches. No parameter changes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import Mesh

from bigmodel.config import ModelConfig
from bigmodel.models import lora
from bigmodel.models.attention import Segments, attend, attention_mask  # noqa: F401
from bigmodel.sharding import constrain, kv_heads_axis

# Activation layouts (logical names; see sharding.RULES).
BSD = ("act_batch", "act_len", "act_embed")
BSF = ("act_batch", "act_len", "act_mlp")
BSHK = ("act_batch", "act_len", "act_heads", "act_kv")
BSV = ("act_batch", "act_len", "act_vocab")



def on_cpu(mesh: Mesh | None) -> bool:
  """Whether the program is compiled for CPU: the mesh's devices (the compile target) decide,
  or without a mesh the default backend. CPU-only tuning (the residual-cotangent buffer, the
  decode-time q/k/v layout) applies only then, so that it never shapes a TPU or GPU program."""
  if mesh is not None:
    return mesh.devices.flat[0].platform == "cpu"
  return jax.default_backend() == "cpu"


def dtype_of(name: str):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def normal(std: float):
  return nn.initializers.normal(stddev=std)


def param_with_axes(init, axes):
  return nn.with_logical_partitioning(init, axes)


class Norm(nn.Module):
  """LayerNorm or RMSNorm, computed in float32."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    d = x.shape[-1]
    pdt = dtype_of(cfg.param_dtype)
    scale = self.param("scale", param_with_axes(nn.initializers.ones, ("norm",)), (d,), pdt)
    x32 = x.astype(jnp.float32)
    if cfg.norm == "layernorm":
      mean = x32.mean(-1, keepdims=True)
      x32 = x32 - mean
      var = jnp.mean(jnp.square(x32), -1, keepdims=True)
      y = x32 * jax.lax.rsqrt(var + cfg.norm_eps) * scale
      bias = self.param("bias", param_with_axes(nn.initializers.zeros, ("norm",)), (d,), pdt)
      y = y + bias
    else:
      ms = jnp.mean(jnp.square(x32), -1, keepdims=True)
      y = x32 * jax.lax.rsqrt(ms + cfg.norm_eps) * scale
    return y.astype(dtype_of(cfg.dtype))


def rotary(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding on [b, s, h, k] by integer positions [b, s] (base: rope_theta).

  The half-split ("rotate_half") pairing of Hugging Face Llama: dim i rotates with i + k/2."""
  k = x.shape[-1]
  half = k // 2
  freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) / half))
  angle = positions[..., None].astype(jnp.float32) * freq          # b s k/2
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def write_rows(cache: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
  """cache [b, t, h, k] with new [b, s, h, k] written at slots start[b] .. start[b] + s - 1.

  One scatter, in place. Slots past the end are dropped (a finished row standing at index t)."""
  b, s = new.shape[:2]
  slots = start[:, None] + jnp.arange(s, dtype=start.dtype)[None, :]          # b s
  return cache.at[jnp.arange(b)[:, None], slots].set(new.astype(cache.dtype), mode="drop",
                                                     unique_indices=True)


class Attention(nn.Module):
  """Self-attention (multi-head, grouped-query or multi-query); a KV cache when `decode`.

  Multi-head (`cfg.kv_heads == num_heads`) keeps one fused projection `qkv` [d, 3, h, k];
  fewer key/value heads g use `q` [d, h, k] and `kv` [d, 2, g, k] (logical axis `kv_heads`:
  sharded over `tensor` where g divides it, else replicated; see bigmodel.sharding)."""
  cfg: ModelConfig
  mesh: Mesh | None = None
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x, mask, positions):
    cfg = self.cfg
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    d, h, k = cfg.d_model, cfg.num_heads, cfg.dim_per_head
    if cfg.kv_heads == h:
      q, key, value = self._fused_qkv(x)
      kv_axes = BSHK
    else:
      q, key, value = self._grouped_qkv(x)
      kv_axes = ("act_batch", "act_len", kv_heads_axis(cfg.kv_heads, self.mesh), "act_kv")
    q = constrain(q, BSHK, self.mesh)
    key, value = (constrain(a, kv_axes, self.mesh) for a in (key, value))
    if cfg.positions == "rope":
      q, key = rotary(q, positions, cfg.rope_theta), rotary(key, positions, cfg.rope_theta)
    if self.decode:
      key, value, mask = self._cached(key, value, mask, positions, kv_axes)
    dropout = None
    if cfg.dropout > 0 and not self.deterministic:
      dropout = functools.partial(nn.Dropout(cfg.dropout), deterministic=False)
    # the KV-cache path stays on xla (its mask is by cache slot)
    impl = "xla" if self.decode else cfg.attention
    out = attend(q, key, value, mask, implementation=impl, mesh=self.mesh, dropout=dropout)
    out = constrain(out, BSHK, self.mesh)
    residual_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    w_out = self.param("out", param_with_axes(normal(residual_std), ("heads", "kv", "embed")),
                       (h, k, d), pdt)
    y = lora.project(self, "out", "bshk,hkd->bsd", out, w_out, ("heads", "kv", "embed"), n_in=2)
    if cfg.use_bias:
      y = y + self.param("out_bias", param_with_axes(nn.initializers.zeros, ("embed",)), (d,),
                         pdt).astype(dt)
    return constrain(y, BSD, self.mesh)

  def _fused_qkv(self, x):
    """q, k, v [b, s, h, k] from the fused `qkv` [d, 3, h, k] (multi-head)."""
    cfg = self.cfg
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    d, h, k = cfg.d_model, cfg.num_heads, cfg.dim_per_head
    w_qkv = self.param("qkv", param_with_axes(normal(cfg.init_std), ("embed", "qkv", "heads", "kv")),
                       (d, 3, h, k), pdt)
    # Decoding on CPU: [b, s, n, h, k], since XLA:CPU transposed the weight for n-first at
    # every step. Everywhere else one layout, n first.
    n_last = self.decode and on_cpu(self.mesh)
    if n_last:
      qkv = lora.project(self, "qkv", "bsd,dnhk->bsnhk", x, w_qkv, ("embed", "qkv", "heads", "kv"))
    else:
      qkv = lora.project(self, "qkv", "bsd,dnhk->nbshk", x, w_qkv, ("embed", "qkv", "heads", "kv"))
    if cfg.use_bias or cfg.qkv_bias:
      b_qkv = self.param("qkv_bias", param_with_axes(nn.initializers.zeros, ("qkv", "heads", "kv")),
                         (3, h, k), pdt)
      qkv = qkv + (b_qkv.astype(dt) if n_last else b_qkv.astype(dt)[:, None, None])
    if n_last:
      return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    return qkv[0], qkv[1], qkv[2]

  def _grouped_qkv(self, x):
    """q [b, s, h, k] from `q` [d, h, k]; k, v [b, s, g, k] from `kv` [d, 2, g, k]."""
    cfg = self.cfg
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    d, h, g, k = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
    init = normal(cfg.init_std)
    w_q = self.param("q", param_with_axes(init, ("embed", "heads", "kv")), (d, h, k), pdt)
    w_kv = self.param("kv", param_with_axes(init, ("embed", "qkv", "kv_heads", "kv")),
                      (d, 2, g, k), pdt)
    q = lora.project(self, "q", "bsd,dhk->bshk", x, w_q, ("embed", "heads", "kv"))
    kv = lora.project(self, "kv", "bsd,dngk->nbsgk", x, w_kv, ("embed", "qkv", "kv_heads", "kv"))
    if cfg.use_bias or cfg.qkv_bias:
      zeros = nn.initializers.zeros
      q = q + self.param("q_bias", param_with_axes(zeros, ("heads", "kv")), (h, k), pdt).astype(dt)
      b_kv = self.param("kv_bias", param_with_axes(zeros, ("qkv", "kv_heads", "kv")), (2, g, k), pdt)
      kv = kv + b_kv.astype(dt)[:, None, None]
    return q, kv[0], kv[1]

  def _cached(self, key, value, mask, positions, axes=BSHK):
    """(keys, values, mask) over the cache after writing this call's keys and values: all of
    it, or its first ModelConfig.decode_span slots (the caller knows no query sees past them).

    The init call only makes the (zero) cache, at the length of its input, and attends as
    usual. RoPE is already applied: the cache holds rotated keys, of the g key/value heads."""
    ready = self.has_variable("cache", "cached_key")
    zeros = param_with_axes(jnp.zeros, BSHK if axes == BSHK else
                            ("act_batch", "act_len", "act_kv_heads", "act_kv"))
    dt = dtype_of(self.cfg.dtype)
    cached_key = self.variable("cache", "cached_key", zeros, key.shape, dt)
    cached_value = self.variable("cache", "cached_value", zeros, value.shape, dt)
    if not ready:
      return key, value, mask
    start = positions[:, 0]
    cached_key.value = constrain(write_rows(cached_key.value, key, start), axes, self.mesh)
    cached_value.value = constrain(write_rows(cached_value.value, value, start), axes, self.mesh)
    span = min(self.cfg.decode_span or cached_key.value.shape[1], cached_key.value.shape[1])
    slots = jnp.arange(span)          # the first `span` slots hold every key a query here sees
    mask = slots[None, None, None, :] <= positions[:, None, :, None]            # b 1 s t
    return cached_key.value[:, :span], cached_value.value[:, :span], mask


class Mlp(nn.Module):
  """GELU MLP or SwiGLU."""
  cfg: ModelConfig
  mesh: Mesh | None = None

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    dt, pdt = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    d, f = cfg.d_model, cfg.mlp_dim
    init = param_with_axes(normal(cfg.init_std), ("embed", "mlp"))
    if cfg.mlp == "swiglu":
      gate = lora.project(self, "wi_gate", "bsd,df->bsf", x, self.param("wi_gate", init, (d, f), pdt),
                          ("embed", "mlp"))
      up = lora.project(self, "wi", "bsd,df->bsf", x, self.param("wi", init, (d, f), pdt),
                        ("embed", "mlp"))
      hidden = jax.nn.silu(gate) * up
    else:
      hidden = lora.project(self, "wi", "bsd,df->bsf", x, self.param("wi", init, (d, f), pdt),
                            ("embed", "mlp"))
      if cfg.use_bias:
        hidden = hidden + self.param("wi_bias", param_with_axes(nn.initializers.zeros, ("mlp",)),
                                     (f,), pdt).astype(dt)
      hidden = jax.nn.gelu(hidden, approximate=cfg.mlp == "gelu")
    hidden = constrain(hidden, BSF, self.mesh)
    residual_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    w_out = self.param("wo", param_with_axes(normal(residual_std), ("mlp", "embed")), (f, d), pdt)
    y = lora.project(self, "wo", "bsf,fd->bsd", hidden, w_out, ("mlp", "embed"))
    if cfg.use_bias:
      y = y + self.param("wo_bias", param_with_axes(nn.initializers.zeros, ("embed",)), (d,),
                         pdt).astype(dt)
    return constrain(y, BSD, self.mesh)


@jax.custom_vjp
def materialize_cotangent(x):
  """Identity whose backward pass keeps the incoming gradient in one buffer.

  The gradient of the residual stream is a running sum over the layers above. Left alone,
  XLA:CPU fuses that chain of adds into every consumer in the backward pass (the transposes
  feeding the weight-gradient matmuls), so the layer at depth i re-adds the contributions of
  all the layers above it: quadratic work, 15% of a GPT-2-small step. Writing the gradient's
  first element back into it in place (a dynamic-update-slice, which needs its operand in a
  buffer) stops the chain at each block; `lax.optimization_barrier` does not, since XLA:CPU
  removes it before fusion. The value is unchanged. CPU only (`Block` applies it where
  `on_cpu`): the TPU and GPU programs keep the plain residual gradient."""
  return x


def _materialize_fwd(x):
  return x, None


def _materialize_bwd(_, g):
  origin = (0,) * g.ndim
  return (jax.lax.dynamic_update_slice(g, jax.lax.slice(g, origin, (1,) * g.ndim), origin),)


materialize_cotangent.defvjp(_materialize_fwd, _materialize_bwd)


class Block(nn.Module):
  """One Transformer layer: attention then MLP, pre-norm (GPT-2) or post-norm (BERT).

  Called as a scan body: `(x, mask, positions) -> (x, None)`.
  """
  cfg: ModelConfig
  mesh: Mesh | None = None
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x, mask, positions):
    cfg = self.cfg
    if on_cpu(self.mesh):
      x = materialize_cotangent(x)
    drop = lambda y: (nn.Dropout(cfg.dropout)(y, deterministic=self.deterministic)
                      if cfg.dropout > 0 else y)
    attn = Attention(cfg, self.mesh, self.deterministic, self.decode, name="attn")
    mlp = Mlp(cfg, self.mesh, name="mlp")
    if cfg.pre_norm:
      x = x + drop(attn(Norm(cfg, name="ln1")(x), mask, positions))
      x = x + drop(mlp(Norm(cfg, name="ln2")(x)))
    else:
      x = Norm(cfg, name="ln1")(x + drop(attn(x, mask, positions)))
      x = Norm(cfg, name="ln2")(x + drop(mlp(x)))
    return constrain(x, BSD, self.mesh), None


REMAT_POLICIES = {
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class BlockStack(nn.Module):
  """`num_layers` Blocks, scanned (one compiled body, params stacked on `layers`) or unrolled.

  When decoding, the scan stacks each layer's cache on a leading `layers` axis, as it does
  the params (bigmodel.infer.decode unrolls the layers for speed; this path stays exact). Remat
  is left out (it only trades memory in a backward pass)."""
  cfg: ModelConfig
  mesh: Mesh | None = None
  deterministic: bool = True
  decode: bool = False

  @nn.compact
  def __call__(self, x, mask, positions):
    cfg = self.cfg
    block_cls = Block
    if cfg.remat != "none" and not self.decode:
      block_cls = nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
    args = (cfg, self.mesh, self.deterministic, self.decode)
    if cfg.scan_layers:
      stack = nn.scan(block_cls, variable_axes={"params": 0, "cache": 0},
                      split_rngs={"params": True, "dropout": True},
                      in_axes=(nn.broadcast, nn.broadcast), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = stack(*args, name="layers")(x, mask, positions)
    else:
      for i in range(cfg.num_layers):
        x, _ = block_cls(*args, name=f"layer_{i}")(x, mask, positions)
    return x


class Embed(nn.Module):
  """Token embedding table [v, d], also used to project back to logits when tied."""
  num_embeddings: int
  cfg: ModelConfig
  axes: tuple[str, str] = ("vocab", "embed")

  def setup(self):
    self.embedding = self.param("embedding", param_with_axes(normal(self.cfg.init_std), self.axes),
                                (self.num_embeddings, self.cfg.d_model),
                                dtype_of(self.cfg.param_dtype))

  def __call__(self, ids):
    dt = dtype_of(self.cfg.dtype)
    if self.cfg.one_hot_embed:
      one_hot = jax.nn.one_hot(ids, self.num_embeddings, dtype=dt)
      return jnp.einsum("bsv,vd->bsd", one_hot, self.embedding.astype(dt))
    return jnp.take(self.embedding, ids, axis=0).astype(dt)

  def attend(self, x):
    dt = dtype_of(self.cfg.dtype)
    return jnp.einsum("bsd,vd->bsv", x, self.embedding.astype(dt))
