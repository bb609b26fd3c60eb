"""Decoder behaviour: packing isolation, causality, options, scan vs unrolled."""

import functools
import re
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from bigmodel import config
from bigmodel.models import layers
from bigmodel.models.decoder import Decoder

CFG = dict(vocab_size=50, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_len=32)


def _apply(cfg, tokens, positions, segments, params=None):
  model = Decoder(cfg)
  if params is None:
    params = model.init(jax.random.key(0), tokens, positions, segments)["params"]
  return model.apply({"params": params}, tokens, positions, segments), params


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_packed_segments_do_not_interact(positions):
  cfg = config.ModelConfig(**CFG, positions=positions)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 50, (2, 24)).astype(np.int32)
  seg = np.array([[1] * 8 + [2] * 10 + [3] * 6] * 2, np.int32)
  pos = np.array([list(range(8)) + list(range(10)) + list(range(6))] * 2, np.int32)
  logits, params = _apply(cfg, tokens, pos, seg)
  changed = tokens.copy()
  changed[:, 8:18] = rng.integers(0, 50, (2, 10))      # rewrite segment 2 only
  logits2, _ = _apply(cfg, changed, pos, seg, params)
  others = np.r_[0:8, 18:24]
  np.testing.assert_allclose(logits2[:, others], logits[:, others], atol=1e-6)
  assert not np.allclose(logits2[:, 8:18], logits[:, 8:18])
  # a packed segment gives the same logits as the same text alone in its own row
  alone, _ = _apply(cfg, tokens[:, 18:], pos[:, 18:], np.ones((2, 6), np.int32), params)
  np.testing.assert_allclose(logits[:, 18:], alone, atol=1e-5)


def test_causal():
  cfg = config.ModelConfig(**CFG)
  tokens = np.arange(16, dtype=np.int32)[None] % 50
  logits, params = _apply(cfg, tokens, None, None)
  changed = tokens.copy()
  changed[0, 10] = 3
  logits2, _ = _apply(cfg, changed, None, None, params)
  np.testing.assert_allclose(logits2[0, :10], logits[0, :10], atol=1e-6)
  assert not np.allclose(logits2[0, 10:], logits[0, 10:])


def test_scan_and_unrolled_agree():
  tokens = np.arange(12, dtype=np.int32)[None]
  scanned, params = _apply(config.ModelConfig(**CFG, scan_layers=True), tokens, None, None)
  # unstack the layer axis into layer_{i}
  p = nn.meta.unbox(params)
  stacked = p["blocks"]["layers"]
  unrolled = dict(p)
  unrolled["blocks"] = {f"layer_{i}": jax.tree.map(lambda x: x[i], stacked) for i in range(2)}
  out, _ = _apply(config.ModelConfig(**CFG, scan_layers=False), tokens, None, None, unrolled)
  np.testing.assert_allclose(out, scanned, atol=1e-5)


@functools.lru_cache(maxsize=1)
def _default_path():
  return _loss_and_grads(config.ModelConfig(**CFG))


def _loss_and_grads(cfg, params=None, dropout_rng=None):
  model = Decoder(cfg)
  tokens = np.arange(16, dtype=np.int32)[None].repeat(2, 0) % 50
  if params is None:
    params = model.init(jax.random.key(0), tokens)["params"]

  def loss(p):
    logits = model.apply({"params": p}, tokens, deterministic=dropout_rng is None,
                         rngs={"dropout": dropout_rng} if dropout_rng is not None else None)
    logits = logits.astype(jnp.float32)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens[..., None], -1)[..., 0])
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return params, float(value), jax.tree.leaves(grads)


# Options that compute the default model's function another way, and how close each must come
# to the default f32 path (same params): (loss relative tolerance, gradient tolerance relative
# to each leaf's largest entry). Remat gives the same loss bit for bit; its gradients come
# from a recomputed forward that XLA:CPU fuses differently, which moves the last bit or two
# (measured: 3.7e-9 on a leaf whose largest entry is 0.049, i.e. 8e-8 relative). The one-hot
# lookup is a matmul by a 0/1 matrix (the embedding gradient sums the same terms in another
# order); bf16 compute keeps f32 params but rounds activations and matmul inputs to 8 bits.
SAME_FUNCTION = {
    "remat_full": (dict(remat="full"), 0.0, 1e-6),
    "remat_dots": (dict(remat="dots"), 0.0, 1e-6),
    "one_hot_embed": (dict(one_hot_embed=True), 1e-6, 1e-6),
    "bf16": (dict(dtype="bfloat16"), 2e-2, 5e-2),
}


@pytest.mark.parametrize("name", sorted(SAME_FUNCTION))
def test_options_equal_the_default_path(name):
  """(loss relative tolerance, gradient tolerance relative to each leaf's largest entry)."""
  opts, loss_tol, grad_tol = SAME_FUNCTION[name]
  params, ref_loss, ref_grads = _default_path()
  _, loss, grads = _loss_and_grads(config.ModelConfig(**CFG, **opts), params)
  assert abs(loss - ref_loss) <= loss_tol * abs(ref_loss), (loss, ref_loss)
  for g, r in zip(grads, ref_grads):
    g, r = np.asarray(g, np.float32), np.asarray(r, np.float32)
    assert np.abs(g - r).max() <= grad_tol * np.abs(r).max(), (name, np.abs(g - r).max(), np.abs(r).max())


@pytest.mark.parametrize("opts", [dict(tie_embeddings=False),
                                  dict(mlp="swiglu", norm="rmsnorm", positions="rope"),
                                  dict(dropout=0.1)])
def test_options_run_and_train(opts):
  """Options that change the model: finite loss and gradients, every gradient leaf nonzero."""
  _, value, grads = _loss_and_grads(config.ModelConfig(**CFG, **opts),
                                    dropout_rng=jax.random.key(1) if opts.get("dropout") else None)
  assert np.isfinite(value)
  assert all(np.isfinite(g).all() for g in grads)
  assert all(np.abs(g).max() > 0 for g in grads)


def test_remat_matches_no_remat():
  tokens = np.arange(16, dtype=np.int32)[None] % 50
  base = config.ModelConfig(**CFG)
  model = Decoder(base)
  params = model.init(jax.random.key(0), tokens)["params"]
  def grads(cfg):
    m = Decoder(cfg)
    return jax.grad(lambda p: m.apply({"params": p}, tokens).sum())(params)
  g0, g1 = grads(base), grads(config.ModelConfig(**CFG, remat="full"))
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_model_options():
  with pytest.raises(config.ConfigError, match="positions"):
    config.ModelConfig(**CFG, positions="alibi")
  with pytest.raises(config.ConfigError, match="divisible"):
    config.ModelConfig(**{**CFG, "num_heads": 5})


def _max_loop_fusion_operands(cfg) -> int:
  """The most operands any elementwise (loop) fusion takes in the compiled backward pass."""
  model = Decoder(cfg)
  tokens = jnp.zeros((2, 16), jnp.int32)
  params = model.init(jax.random.key(0), tokens)["params"]
  hlo = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, tokens) ** 2))) \
      .lower(params).compile().as_text()
  return max(len(re.findall(r"%[\w.\-]+", m.group(1)))
             for m in re.finditer(r" fusion\((.*?)\), kind=kLoop", hlo))


def test_residual_gradient_is_materialized_per_layer():
  """Without `layers.materialize_cotangent`, XLA fuses the residual stream's gradient (a sum
  over all the layers above) into every consumer: the widest fusion grows with depth (74
  operands at 4 layers, 204 at 12). With it, the widest fusion is the same at any depth, and
  the gradients are unchanged."""
  cfg = dict(vocab_size=64, d_model=32, num_heads=4, d_ff=64, max_len=16, scan_layers=False)
  shallow = _max_loop_fusion_operands(config.ModelConfig(**cfg, num_layers=4))
  deep = _max_loop_fusion_operands(config.ModelConfig(**cfg, num_layers=12))
  assert deep == shallow, (shallow, deep)

  model = Decoder(config.ModelConfig(**cfg, num_layers=3))
  tokens = jnp.arange(32, dtype=jnp.int32).reshape(2, 16) % 64
  params = model.init(jax.random.key(1), tokens)["params"]
  loss = lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, tokens)))
  with_barrier = jax.grad(loss)(params)
  with mock.patch.object(layers, "materialize_cotangent", lambda x: x):
    plain = jax.grad(loss)(params)
  for a, b in zip(jax.tree.leaves(with_barrier), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(a, b)
