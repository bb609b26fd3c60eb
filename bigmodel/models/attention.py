"""The attention core: scores, softmax and values, by the implementation `ModelConfig.attention` names.

    out = attend(q [b, s, h, k], key [b, t, g, k], value [b, t, g, k], mask, implementation=...)

Grouped-query attention: g key/value heads may be fewer than the h query heads (g divides h;
query head i reads key/value head i // (h / g)); no implementation repeats K/V in memory.
Einsum letters as in `layers`, plus g key/value heads and r = h / g query heads per group.

`mask` is a `Segments` (segment ids of queries and keys, 0 = padding, and a causal flag: what
training and prefill pass, so that no implementation needs the [b, s, t] mask), or a dense
boolean [b, 1, s, t] mask (the KV-cache decode path, always on `xla`).

Implementations:
  xla          the scores [b, h, s, t] in float32, masked, softmax, values (the default; the CPU
               path; attention dropout only here). On CPU a decode step of several rows (one
               query a row) takes `_one_query`, which reads the KV cache where it lies.
  dot_product  `jax.nn.dot_product_attention`: implementation 'cudnn' on GPU, 'xla' elsewhere.
  cudnn        the same, cuDNN required (a GPU).
  splash       the Pallas TPU splash-attention kernel (`jax.experimental.pallas.ops.tpu.
               splash_attention`): causal mask and segment ids inside the kernel, so packed
               documents never attend to each other and no [s, t] buffer exists; wrapped in
               `shard_map` over the mesh (batch over data x fsdp, heads over tensor), as MaxText
               does. TPU only; `interpret=True` runs it in the Pallas interpreter on CPU (tests).
"""

from __future__ import annotations

import logging
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from bigmodel.config import ConfigError

log = logging.getLogger(__name__)

IMPLEMENTATIONS = ("xla", "dot_product", "cudnn", "splash")
NEG_INF = -1e9
SPLASH_BLOCK = 512      # MaxText's default splash block sizes (sa_block_*); smaller for short rows
SPLASH_MIN_BLOCK = 128  # the kernel's lane width: sequence lengths must be a multiple of it


def attention_mask(segment_q: jax.Array, segment_k: jax.Array, causal: bool) -> jax.Array:
  """Boolean [b, 1, s, t]: attend only within a segment (0 = padding), causally if asked."""
  mask = (segment_q[:, :, None] == segment_k[:, None, :]) & (segment_k[:, None, :] != 0)
  if causal:
    s, t = segment_q.shape[1], segment_k.shape[1]
    mask = mask & jnp.tril(jnp.ones((s, t), dtype=bool), k=t - s)
  return mask[:, None, :, :]


@flax.struct.dataclass
class Segments:
  """Who may attend to whom, without the [b, s, t] mask: segment ids [b, s] of the queries and
  [b, t] of the keys (equal ids attend; 0 = padding, attended by none), and causality."""
  q: jax.Array
  k: jax.Array
  causal: bool = flax.struct.field(pytree_node=False, default=False)

  def dense(self) -> jax.Array:
    return attention_mask(self.q, self.k, self.causal)


def _platform(mesh: Mesh | None) -> str:
  return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def check(implementation: str, mesh: Mesh | None, *, dropout: bool = False,
          interpret: bool = False) -> None:
  """ConfigError for a combination that cannot run, saying what to use instead."""
  if implementation not in IMPLEMENTATIONS:
    raise ConfigError(f"ModelConfig.attention={implementation!r}: expected one of {IMPLEMENTATIONS}")
  platform = _platform(mesh)
  if dropout and implementation != "xla":
    raise ConfigError(f"ModelConfig.attention={implementation!r} has no attention dropout; "
                      "set ModelConfig.dropout = 0 or ModelConfig.attention = 'xla'")
  if implementation == "cudnn" and platform != "gpu":
    raise ConfigError(f"ModelConfig.attention='cudnn' needs a GPU (this program is for {platform}); "
                      "use 'dot_product' (cuDNN on GPU, XLA elsewhere) or 'xla'")
  if implementation == "splash" and platform != "tpu" and not interpret:
    raise ConfigError(f"ModelConfig.attention='splash' is a TPU kernel (this program is for "
                      f"{platform}); use 'xla' or 'dot_product' here, and 'splash' when compiling "
                      "for TPU (bigmodel compile --topology, or training on a TPU VM)")


def attend(q: jax.Array, key: jax.Array, value: jax.Array, mask, *, implementation: str = "xla",
           mesh: Mesh | None = None, dropout: Callable[[jax.Array], jax.Array] | None = None,
           interpret: bool = False) -> jax.Array:
  """Attention of q [b, s, h, k] over key/value [b, t, g, k] -> [b, s, h, k] (q's dtype).

  mask: `Segments` or a dense boolean [b, 1, s, t]. dropout: applied to the probabilities
  (the caller's `nn.Dropout`; xla only). The scale is k ** -0.5, applied to q."""
  h, g = q.shape[2], key.shape[2]
  if h % g:
    raise ConfigError(f"{h} query heads are not a multiple of {g} key/value heads")
  check(implementation, mesh, dropout=dropout is not None, interpret=interpret)
  if implementation == "splash" and not isinstance(mask, Segments):
    raise ValueError("splash attention takes Segments (segment ids and causal), not a dense mask")
  q = q * (q.shape[-1] ** -0.5)
  if implementation == "xla":
    dense = mask.dense() if isinstance(mask, Segments) else mask
    if q.shape[0] > 1 and q.shape[1] == 1 and dropout is None and _platform(mesh) == "cpu":
      return _one_query(q, key, value, dense)
    return _xla(q, key, value, dense, dropout)
  if implementation == "splash":
    return _splash(q, key, value, mask, mesh, interpret)
  impl = "cudnn" if implementation == "cudnn" or _platform(mesh) == "gpu" else "xla"
  causal = isinstance(mask, Segments) and mask.causal
  dense = attention_mask(mask.q, mask.k, causal=False) if isinstance(mask, Segments) else mask
  return jax.nn.dot_product_attention(q, key, value, mask=dense, scale=1.0, is_causal=causal,
                                      implementation=impl).astype(q.dtype)


def _one_query(q, key, value, mask):
  """One query a row (a decode step of several rows) on CPU, over keys/values in their cache
  layout [b, t, g, k].

  The einsum form of `_xla` lowers on XLA:CPU to dots batched over (b, h), which first copy
  the whole cache into [b, h, k, t] and [b, h, t, k] at every step. Here the dots are batched
  over b only, so the cache is read where it lies:
  - scores: each row's cache [t, g, k] against the block matrix [g, k, h] that holds query head
    i's vector under key head i // r (r = h / g; zeros elsewhere);
  - values: the probabilities [t, h] against the cache [t, g, k]; each head keeps its group's
    block.
  g times the attention FLOPs of the einsum form (g key/value heads), which at one query a row
  cost less than the copies. At batch 1 XLA:CPU copies this form's cache instead (the einsum
  form's copies are then smaller), so `attend` takes it from batch 2."""
  b, _, h, k = q.shape
  t, g = key.shape[1], key.shape[2]
  groups = (jnp.arange(h)[None, :] // (h // g) == jnp.arange(g)[:, None]).astype(q.dtype)  # g h
  blocks = jnp.einsum("bhk,gh->bgkh", q[:, 0], groups)
  scores = jnp.einsum("btgk,bgkh->bth", key, blocks.astype(key.dtype),
                      preferred_element_type=jnp.float32)
  scores = jnp.where(mask[:, 0, 0, :, None], scores, NEG_INF)
  probs = jax.nn.softmax(scores, axis=1).astype(q.dtype)                      # b t h
  full = jnp.einsum("bth,btgk->bhgk", probs, value)
  out = jnp.einsum("bhgk,gh->bhk", full, groups)
  return out[:, None].astype(q.dtype)


def _xla(q, key, value, mask, dropout):
  """Materialized float32 scores. Multi-head keeps the one einsum pair it always had; grouped
  heads view q as [b, s, g, r, k] and contract against the g key/value heads directly."""
  b, s, h, k = q.shape
  g = key.shape[2]
  if g == h:
    scores = jnp.einsum("bshk,bthk->bhst", q, key).astype(jnp.float32)
    scores = jnp.where(mask, scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    if dropout is not None:
      probs = dropout(probs)
    return jnp.einsum("bhst,bthk->bshk", probs, value)
  qg = q.reshape(b, s, g, h // g, k)
  scores = jnp.einsum("bsgrk,btgk->bgrst", qg, key).astype(jnp.float32)
  scores = jnp.where(mask[:, :, None], scores, NEG_INF)                     # mask b 1 1 s t
  probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
  if dropout is not None:
    probs = dropout(probs)
  return jnp.einsum("bgrst,btgk->bsgrk", probs, value).reshape(b, s, h, k)


def _splash_kernel(h: int, s: int, t: int, causal: bool, head_shards: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm
  for n, name in ((s, "query"), (t, "key")):
    if n % SPLASH_MIN_BLOCK:
      raise ConfigError(f"splash attention needs the {name} length ({n}) to be a multiple of "
                        f"{SPLASH_MIN_BLOCK}; set DataConfig.seq_len accordingly or use 'xla'")
  bq, bkv = min(SPLASH_BLOCK, s), min(SPLASH_BLOCK, t)
  bq = bq if s % bq == 0 else SPLASH_MIN_BLOCK
  bkv = bkv if t % bkv == 0 else SPLASH_MIN_BLOCK
  blocks = sk.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                         block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
  one = sm.CausalMask((s, t)) if causal else sm.FullMask((s, t))
  return sk.make_splash_mha(sm.MultiHeadMask([one] * h), block_sizes=blocks, head_shards=head_shards,
                            q_seq_shards=1, interpret=interpret)


def _splash_call(kernel, q, key, value, seg_q, seg_k):
  """Per-device body: q [b, h, s, k], key/value [b, g, t, k] -> [b, h, s, k]."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  return jax.vmap(lambda q, k, v, a, b: kernel(q, k, v, segment_ids=sk.SegmentIds(a, b)))(
      q, key, value, seg_q, seg_k)


def _splash(q, key, value, seg: Segments, mesh: Mesh | None, interpret: bool):
  b, s, h, _ = q.shape
  t, g = key.shape[1], key.shape[2]
  qt, kt, vt = (jnp.swapaxes(a, 1, 2) for a in (q, key, value))          # b h s k, b g t k
  seg_q, seg_k = seg.q.astype(jnp.int32), seg.k.astype(jnp.int32)
  if mesh is None:
    kernel = _splash_kernel(h, s, t, seg.causal, 1, interpret)
    return jnp.swapaxes(_splash_call(kernel, qt, kt, vt, seg_q, seg_k), 1, 2)
  from bigmodel.sharding import BATCH_AXES
  ways = mesh.shape["data"] * mesh.shape["fsdp"]
  tensor = mesh.shape["tensor"]
  batch_ax = BATCH_AXES if b % ways == 0 else None
  head_ax = "tensor" if tensor > 1 and h % tensor == 0 else None
  kv_ax = head_ax if head_ax and g % tensor == 0 else None
  slice_kv = head_ax is not None and kv_ax is None
  if slice_kv and tensor % g:
    log.warning("splash: %d key/value heads neither divide nor are divided by tensor=%d; "
                "repeating them to the %d query heads", g, tensor, h)
    kt, vt = jnp.repeat(kt, h // g, axis=1), jnp.repeat(vt, h // g, axis=1)
    kv_ax, slice_kv, g = head_ax, False, h
  kernel = _splash_kernel(h, s, t, seg.causal, tensor if head_ax else 1, interpret)
  kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, P(head_ax, None)))
  q_spec, kv_spec, seg_spec = P(batch_ax, head_ax), P(batch_ax, kv_ax), P(batch_ax)

  def body(kernel, q, k, v, seg_q, seg_k):
    if slice_kv:   # g divides tensor: this shard's query heads all read one key/value head
      j = jax.lax.axis_index("tensor") // (tensor // g)
      k, v = (jax.lax.dynamic_slice_in_dim(a, j, 1, axis=1) for a in (k, v))
    return _splash_call(kernel, q, k, v, seg_q, seg_k)

  out = jax.shard_map(body, mesh=mesh, in_specs=(kernel_spec, q_spec, kv_spec, kv_spec, seg_spec,
                                                 seg_spec),
                      out_specs=q_spec, check_vma=False)(kernel, qt, kt, vt, seg_q, seg_k)
  return jnp.swapaxes(out, 1, 2)
