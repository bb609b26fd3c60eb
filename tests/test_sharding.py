"""Mesh equivalence and rule coverage for the decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from bigmodel import config, sharding
from bigmodel.config import MeshConfig
from bigmodel.models.decoder import Decoder
from bigmodel.objectives import lm
from bigmodel.train import state as state_lib

CFG = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_len=32)
MESHES = {
    "data=8": MeshConfig(data=8),
    "fsdp=8": MeshConfig(data=1, fsdp=8),
    "data=2,fsdp=2,tensor=2": MeshConfig(data=2, fsdp=2, tensor=2),
}


def _batch(seed=0, b=8, s=16):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 64, (b, s + 1)).astype(np.int32)
  seg = np.ones((b, s), np.int32)
  seg[:, s // 2:] = 2          # two packed segments per row
  pos = np.concatenate([np.arange(s // 2), np.arange(s - s // 2)])[None].repeat(b, 0).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "positions": pos,
          "segment_ids": seg, "weights": np.ones((b, s), np.float32)}


def _loss_and_grads(model_cfg, mesh, params, batch):
  model = Decoder(model_cfg, mesh)
  abstract, specs = state_lib.abstract_state(
      model, __import__("optax").sgd(0.1), lm.model_args(lm.example_batch(8, 16)))
  p_sh = sharding.logical_to_sharding(specs.params, mesh, abstract.params)
  b_sh = sharding.batch_sharding(mesh)
  params = jax.device_put(params, p_sh)
  batch = jax.device_put(batch, b_sh)

  def f(p, b):
    loss_sum, aux = lm.causal_lm_loss(model, p, b)
    return loss_sum / aux["weight"]
  fn = jax.jit(jax.value_and_grad(f), in_shardings=(p_sh, b_sh),
               out_shardings=(sharding.replicated(mesh), p_sh))
  loss, grads = fn(params, batch)
  return float(loss), jax.device_get(grads)


@pytest.mark.parametrize("options", [{}, {"positions": "rope", "norm": "rmsnorm", "mlp": "swiglu",
                                          "scan_layers": False, "remat": "full"}],
                         ids=["gpt2", "rope-rms-swiglu-unrolled-remat"])
def test_mesh_equivalence(options):
  cfg = config.ModelConfig(**CFG, **options)
  one = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  init = jax.jit(Decoder(cfg).init)              # one compile, not op by op
  params = nn.meta.unbox(init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"])
  batch = _batch()
  ref_loss, ref_grads = _loss_and_grads(cfg, one, params, batch)
  for name, mesh_cfg in MESHES.items():
    mesh = sharding.make_mesh(mesh_cfg)
    loss, grads = _loss_and_grads(cfg, mesh, params, batch)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=name)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7, err_msg=f"{name} {jax.tree_util.keystr(path)}")


def test_params_are_sharded_as_annotated():
  cfg = config.ModelConfig(**CFG)
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  tx = __import__("optax").adamw(1e-3)
  st = state_lib.init_state(Decoder(cfg, mesh), tx, lm.model_args(lm.example_batch(8, 16)), mesh,
                            jax.random.key(0))
  qkv = st.params["blocks"]["layers"]["attn"]["qkv"]          # [layers, d, 3, h, k]
  assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None, "tensor", None)
  emb = st.params["embed"]["embedding"]                        # [v, d]
  assert emb.sharding.spec == jax.sharding.PartitionSpec("tensor", "fsdp")
  # optimizer moments follow their params
  mu = st.opt_state[0].mu["blocks"]["layers"]["attn"]["qkv"]
  assert mu.sharding.spec == qkv.sharding.spec
  # a shard holds 1/4 of the embedding table
  assert emb.addressable_shards[0].data.shape == (32, 16)


def _all_activation_names():
  import bigmodel.models.layers as layers
  names = set()
  for value in vars(layers).values():
    if isinstance(value, tuple) and value and all(isinstance(v, str) and v.startswith("act_") for v in value):
      names.update(value)
  return names


def test_every_logical_axis_has_a_rule():
  for options in ({}, {"tie_embeddings": False, "mlp": "swiglu", "scan_layers": False}):
    cfg = config.ModelConfig(**CFG, **options)
    boxed = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    names = sharding.logical_names(boxed["params"])
    assert {"vocab", "embed", "heads", "kv", "mlp", "layers" if cfg.scan_layers else "norm"} <= names
    assert names <= sharding.RULE_NAMES, names - sharding.RULE_NAMES
  acts = _all_activation_names()
  assert {"act_batch", "act_len", "act_embed", "act_heads", "act_mlp", "act_vocab"} <= acts
  assert acts <= sharding.RULE_NAMES
  # weight and activation names are disjoint, so FSDP weight specs never bind activations
  weights = {n for n, _ in sharding.RULES if not n.startswith("act_")}
  assert not weights & acts


def test_unknown_logical_name_is_refused():
  mesh = sharding.make_mesh(MeshConfig())
  with pytest.raises(ValueError, match="no rule"):
    sharding.constrain(jnp.zeros((8, 4)), ("act_batch", "act_nonsense"), mesh)


def test_batch_not_divisible_by_data_parallel_size():
  mesh = sharding.make_mesh(MeshConfig(data=4, fsdp=2))
  with pytest.raises(config.ConfigError, match="not divisible by the data-parallel size 8"):
    sharding.check_batch(12, mesh)


def test_mesh_shape_errors():
  with pytest.raises(config.ConfigError, match="does not fit 8 devices"):
    sharding.make_mesh(MeshConfig(data=3, fsdp=1))
  assert dict(sharding.make_mesh(MeshConfig(data=-1, tensor=2)).shape) == {"data": 4, "fsdp": 1, "tensor": 2}


def test_indivisible_dimension_falls_back_to_unsharded():
  cfg = config.ModelConfig(**{**CFG, "vocab_size": 257})
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
  st = state_lib.init_state(Decoder(cfg, mesh), __import__("optax").sgd(0.1),
                            lm.model_args(lm.example_batch(8, 16)), mesh, jax.random.key(0))
  emb = st.params["embed"]["embedding"]
  assert emb.shape == (257, 32)
  assert emb.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
