"""Fused attention paths against the xla path (causal, packed documents, padding, grouped-query
heads; forward and gradient), the splash kernel compiled for a TPU slice at seq 8192, the
clear errors for paths that cannot run here, and the vocabulary-chunked LM loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from bigmodel import config
from bigmodel.config import ConfigError, MeshConfig
from bigmodel.models import attention
from bigmodel.models.decoder import Decoder
from bigmodel.objectives import lm


def _qkv(b, s, h, g, k, seed=0):
  r = np.random.RandomState(seed)
  return tuple(jnp.asarray(r.randn(b, s, n, k), jnp.float32) for n in (h, g, g))


def _segments(b, s):
  """Each row: three packed documents, then padding (segment 0) in its last quarter."""
  seg = np.ones((b, s), np.int32)
  seg[:, s // 3:] = 2
  seg[:, s // 2:] = 3
  seg[:, 3 * s // 4:] = 0
  return jnp.asarray(seg)


def _check_against_xla(implementation, s, **kw):
  b, h, g, k = 1, 2, 1, 16                           # grouped-query: 2 query heads per KV head
  q, key, value = _qkv(b, s, h, g, k)
  seg = _segments(b, s)
  mask = attention.Segments(seg, seg, causal=True)
  real = (seg != 0)[:, :, None, None]             # padding queries' outputs are never used
  cotangent = jnp.where(real, jnp.cos(jnp.arange(k, dtype=jnp.float32)), 0) * jnp.ones((b, s, h, k))

  def run(impl, extra):
    out, vjp = jax.vjp(lambda *a: attention.attend(*a, mask, implementation=impl, **extra),
                       q, key, value)
    return np.where(real, out, 0), vjp(cotangent)
  want, g_want = run("xla", {})
  got, g_got = run(implementation, kw)
  np.testing.assert_allclose(got, want, atol=2e-6)
  for a, w in zip(g_got, g_want):
    np.testing.assert_allclose(a, w, atol=2e-5)
  # the grouped heads equal plain multi-head attention over repeated keys and values
  rep = attention.attend(q, jnp.repeat(key, 2, axis=2), jnp.repeat(value, 2, axis=2), mask)
  np.testing.assert_allclose(np.where(real, rep, 0), want, atol=1e-6)


def test_dot_product_equals_xla():
  _check_against_xla("dot_product", 24)


def test_splash_in_the_pallas_interpreter_equals_xla():
  """The TPU kernel itself, run by the Pallas interpreter on CPU (rows of 128: its lane width)."""
  _check_against_xla("splash", 128, interpret=True)


@pytest.mark.parametrize("h,g", [(4, 4), (4, 2), (4, 1)])
def test_one_query_path_equals_the_einsum_path_and_copies_no_cache(h, g):
  """A decode step of several rows on CPU (`attention._one_query`): the einsum form's output
  for multi-head, grouped and multi-query heads, each row attending over its own cache prefix;
  and its compiled program holds no cache-sized transpose or copy (the einsum form's has two)."""
  b, t, k = 3, 40, 16
  q, _, _ = _qkv(b, 1, h, g, k, seed=1)
  _, key, value = _qkv(b, t, h, g, k, seed=2)
  lengths = jnp.asarray([1, 17, 40])
  mask = (jnp.arange(t)[None, :] < lengths[:, None])[:, None, None, :]       # b 1 1 t
  got = attention.attend(q, key, value, mask)                               # CPU: _one_query
  want = attention._xla(q * k ** -0.5, key, value, mask, None)
  np.testing.assert_allclose(got, want, atol=2e-6)
  # row 0 sees one key: its output is that key's value
  np.testing.assert_allclose(got[0, 0], jnp.repeat(value[0, 0], h // g, axis=0), atol=2e-6)

  def cache_copies(fn):
    hlo = jax.jit(fn).lower(q, key, value, mask).compile().as_text()
    return [line for line in hlo.splitlines()
            if ("transpose(" in line or " copy(" in line) and f"{b},{t},{g},{k}" not in line
            and (f"[{b},{g},{k},{t}]" in line or f"[{b},{g},{t},{k}]" in line
                 or f"[{b},{h},{k},{t}]" in line or f"[{b},{h},{t},{k}]" in line)]
  assert not cache_copies(lambda *a: attention.attend(*a))
  assert cache_copies(lambda q, *a: attention._xla(q, *a, None))


def test_model_dot_product_equals_xla_and_errors_name_the_fix():
  cfg = config.ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, d_ff=64,
                           max_len=16)
  tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 16)))
  seg = _segments(2, 16)
  params = Decoder(cfg).init(jax.random.key(0), tokens)["params"]
  out = {impl: Decoder(config.ModelConfig(**{**cfg.__dict__, "attention": impl})).apply(
      {"params": params}, tokens, segment_ids=seg) for impl in ("xla", "dot_product")}
  real = np.asarray(seg != 0)[..., None]
  np.testing.assert_allclose(np.where(real, out["dot_product"], 0), np.where(real, out["xla"], 0),
                             atol=1e-5)
  for impl, words in (("splash", "TPU kernel"), ("cudnn", "needs a GPU")):
    with pytest.raises(ConfigError, match=words):
      Decoder(config.ModelConfig(**{**cfg.__dict__, "attention": impl})).apply(
          {"params": params}, tokens)
  with pytest.raises(ConfigError, match="dropout"):
    attention.check("dot_product", None, dropout=True)
  with pytest.raises(ConfigError, match="attention"):
    config.ModelConfig(vocab_size=8, attention="flash")


def test_splash_compiles_for_tpu_at_seq_8192_without_the_score_matrix():
  """Forward and backward of splash attention for a v5e-8 slice (batch over the 8 chips), per chip
  batch 1 x 2 heads x 8192^2: float32 scores would be 512 MiB; all temporaries stay far under.
  (The whole train step, xla against splash: README, "Fused attention".)"""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from bigmodel import topology
  seq = 8192
  mesh = topology.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1),
                            topology.topology_devices(topology.parse("v5e-8")))
  rows = NamedSharding(mesh, P(("data", "fsdp")))
  q = jax.ShapeDtypeStruct((8, seq, 2, 128), jnp.bfloat16, sharding=rows)
  seg = jax.ShapeDtypeStruct((8, seq), jnp.int32, sharding=rows)
  loss = lambda q, seg: jnp.sum(attention.attend(
      q, q, q, attention.Segments(seg, seg, causal=True), implementation="splash", mesh=mesh))
  compiled = jax.jit(jax.grad(loss)).lower(q, seg).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert 0 < temp < 1 * 2 * seq * seq * 4 / 16, temp


def _tiny_lm(tie):
  cfg = config.ModelConfig(vocab_size=97, d_model=32, num_layers=1, num_heads=4, d_ff=64,
                           max_len=16, tie_embeddings=tie)
  r = np.random.RandomState(1)
  batch = {"inputs": r.randint(0, 97, (3, 13)), "targets": r.randint(0, 97, (3, 13)),
           "positions": np.tile(np.arange(13), (3, 1)), "segment_ids": _segments(3, 13),
           "weights": (r.rand(3, 13) > 0.2).astype(np.float32)}
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  params = nn.meta.unbox(Decoder(cfg).init(jax.random.key(2), batch["inputs"])["params"])
  return cfg, params, batch


@pytest.mark.parametrize("tie", [True, False])
def test_chunked_loss_equals_plain_loss(tie):
  """Chunks of 5 positions over rows of 13 (the last chunk padded with weight 0)."""
  cfg, params, batch = _tiny_lm(tie)

  def loss(chunk):
    model = Decoder(config.ModelConfig(**{**cfg.__dict__, "loss_chunk": chunk}))
    def f(p):
      loss_sum, aux = lm.causal_lm_loss(model, p, batch)
      return loss_sum / aux["weight"], aux
    return jax.value_and_grad(f, has_aux=True)(params)
  (plain, aux_p), g_plain = loss(0)
  (chunked, aux_c), g_chunked = loss(5)
  assert abs(float(chunked) - float(plain)) <= 1e-6 * abs(float(plain)), (chunked, plain)
  assert float(aux_c["weight"]) == float(aux_p["weight"])
  assert float(aux_c["correct"]) == float(aux_p["correct"])
  for a, w in zip(jax.tree.leaves(g_chunked), jax.tree.leaves(g_plain)):
    np.testing.assert_allclose(a, w, rtol=1e-5, atol=1e-7)
  text = jax.jit(lambda p: loss(5)[0][0]).lower(params).as_text()
  assert "3x13x97xf32" not in text and "3x5x97xf32" in text   # one chunk of logits at a time
