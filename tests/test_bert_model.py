"""The BERT encoder and its MLM + NSP objective: padding, loss invariances, mesh equivalence."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from bigmodel import config, sharding
from bigmodel.config import MeshConfig
from bigmodel.models.encoder import Encoder
from bigmodel.objectives import bert
from bigmodel.train import state as state_lib

CFG = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_len=32,
           pre_norm=False, mlp="gelu_exact", norm_eps=1e-12)
MESHES = {
    "data=8": MeshConfig(data=8),
    "fsdp=8": MeshConfig(data=1, fsdp=8),
    "data=2,fsdp=2,tensor=2": MeshConfig(data=2, fsdp=2, tensor=2),
}


def _batch(seed=0, b=8, s=16, p=4):
  """Rows of random lengths: [CLS] A [SEP] B [SEP] [PAD]..., p masked slots, some unused."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(8, s + 1, b)
  ar = np.arange(s)[None]
  mask = (ar < lengths[:, None]).astype(np.int32)
  ids = np.where(mask, rng.integers(5, 64, (b, s)), 0).astype(np.int32)
  ids[:, 0] = 2
  len_a = lengths // 2 - 1
  seg = ((ar >= len_a[:, None] + 2) & mask.astype(bool)).astype(np.int32)
  positions = np.stack([np.sort(rng.choice(np.arange(1, n - 1), p, replace=False)) for n in lengths])
  counts = rng.integers(1, p + 1, b)
  weights = (np.arange(p)[None] < counts[:, None]).astype(np.float32)
  positions = np.where(weights > 0, positions, 0).astype(np.int32)
  labels = np.where(weights > 0, np.take_along_axis(ids, positions, 1), 0).astype(np.int32)
  return {"input_ids": ids, "input_mask": mask, "segment_ids": seg, "masked_lm_positions": positions,
          "masked_lm_ids": labels, "masked_lm_weights": weights,
          "next_sentence_labels": rng.integers(0, 2, b).astype(np.int32),
          "next_sentence_weights": np.ones(b, np.float32)}


_PARAMS = {}


def _init(cfg, batch):
  """Initial params: compiled once (not op by op) and shared by the tests of one config; they
  depend on the config and the batch's shapes only."""
  key = (repr(cfg), tuple((k, np.shape(v)) for k, v in sorted(batch.items())))
  if key not in _PARAMS:
    init = jax.jit(Encoder(cfg).init)
    _PARAMS[key] = nn.meta.unbox(init(jax.random.key(0), *bert.model_args(batch))["params"])
  return _PARAMS[key]


def _loss(cfg, params, batch, **kw):
  loss_sum, aux = bert.mlm_nsp_loss(Encoder(cfg), params, batch, **kw)
  return loss_sum / jnp.maximum(aux["weight"], 1.0), aux


def _shapes(module, *args):
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), *args))
  out = jax.eval_shape(lambda v: module.apply(v, *args), variables)
  return nn.meta.unbox(variables["params"]), out


def test_param_tree_and_trunk():
  cfg = config.ModelConfig(**CFG)
  args = bert.model_args(_batch())
  params, out = _shapes(Encoder(cfg), *args)
  assert set(params) == {"embed", "pos_embed", "type_embed", "embed_norm", "blocks", "pooler",
                         "mlm", "nsp"}
  assert set(params["mlm"]) == {"dense", "norm", "bias"} and params["mlm"]["bias"].shape == (64,)
  assert params["nsp"]["kernel"].shape == (32, 2)
  assert out["mlm_logits"].shape == (8, 4, 64) and out["nsp_logits"].shape == (8, 2)
  trunk, out = _shapes(Encoder(cfg, heads=()), *args)
  assert set(trunk) == set(params) - {"mlm", "nsp"}
  assert out["hidden"].shape == (8, 16, 32) and out["pooled"].shape == (8, 32)
  assert "mlm_logits" not in out
  pre, _ = _shapes(Encoder(config.ModelConfig(**{**CFG, "pre_norm": True})), *args)
  assert "final_norm" in pre
  _, full = _shapes(Encoder(cfg), *args[:3])
  assert full["mlm_logits"].shape == (8, 16, 64)           # no positions: every position
  with pytest.raises(ValueError, match="max_len"):
    _shapes(Encoder(cfg), jnp.zeros((1, 40), jnp.int32))


def test_every_logical_axis_has_a_rule():
  for options in ({}, {"scan_layers": False, "pre_norm": True}):
    cfg = config.ModelConfig(**{**CFG, **options})
    boxed = jax.eval_shape(lambda: Encoder(cfg).init(jax.random.key(0), *bert.model_args(_batch())))
    names = sharding.logical_names(boxed["params"])
    assert {"vocab", "embed", "heads", "mlp", "classes", "pos"} <= names
    assert names <= sharding.RULE_NAMES, names - sharding.RULE_NAMES
    specs = nn.get_partition_spec(boxed["params"])
    flat = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(boxed["params"]))
    assert len(jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))) == len(flat)


def test_padding_does_not_leak():
  cfg = config.ModelConfig(**CFG)
  batch = _batch()
  params = _init(cfg, batch)
  apply = jax.jit(Encoder(cfg).apply)
  out = apply({"params": params}, *bert.model_args(batch))
  changed = dict(batch)
  changed["input_ids"] = np.where(batch["input_mask"] == 1, batch["input_ids"], 17).astype(np.int32)
  out2 = apply({"params": params}, *bert.model_args(changed))
  real = batch["input_mask"] == 1
  np.testing.assert_allclose(np.asarray(out2["hidden"])[real], np.asarray(out["hidden"])[real], atol=1e-5)
  np.testing.assert_allclose(out2["mlm_logits"], out["mlm_logits"], atol=1e-5)
  np.testing.assert_allclose(out2["nsp_logits"], out["nsp_logits"], atol=1e-5)


def test_mlm_loss_ignores_unmasked_positions():
  """Labels (and positions) in unused slots, weight 0, change neither the loss nor its gradient."""
  cfg = config.ModelConfig(**CFG)
  batch = _batch()
  params = _init(cfg, batch)
  grad = jax.jit(jax.value_and_grad(lambda p, b: _loss(cfg, p, b)[0]))
  loss, g = grad(params, batch)
  unused = batch["masked_lm_weights"] == 0
  assert unused.any()
  rng = np.random.default_rng(1)
  changed = dict(batch)
  changed["masked_lm_ids"] = np.where(unused, rng.integers(0, 64, unused.shape), batch["masked_lm_ids"]).astype(np.int32)
  changed["masked_lm_positions"] = np.where(unused, rng.integers(0, 16, unused.shape),
                                            batch["masked_lm_positions"]).astype(np.int32)
  loss2, g2 = grad(params, changed)
  assert float(loss2) == pytest.approx(float(loss), rel=1e-6)
  for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  # a label at a used slot does matter
  changed = dict(batch)
  changed["masked_lm_ids"] = batch["masked_lm_ids"].copy()
  changed["masked_lm_ids"][0, 0] = (batch["masked_lm_ids"][0, 0] + 1) % 64
  assert float(grad(params, changed)[0]) != pytest.approx(float(loss), rel=1e-6)


def test_loss_is_mlm_mean_plus_nsp_mean():
  cfg = config.ModelConfig(**CFG)
  batch = _batch()
  params = _init(cfg, batch)
  loss, aux = jax.jit(lambda p, b: _loss(cfg, p, b))(params, batch)   # compiled, not op by op
  out = jax.jit(Encoder(cfg).apply)({"params": params}, *bert.model_args(batch))
  w = batch["masked_lm_weights"]
  mlm = optax.softmax_cross_entropy_with_integer_labels(out["mlm_logits"], batch["masked_lm_ids"])
  nsp = optax.softmax_cross_entropy_with_integer_labels(out["nsp_logits"], batch["next_sentence_labels"])
  want_mlm, want_nsp = float((mlm * w).sum() / w.sum()), float(nsp.mean())
  assert float(loss) == pytest.approx(want_mlm + want_nsp, rel=1e-5)
  metrics = bert.summarize(jax.device_get(aux))
  assert metrics["mlm_loss"] == pytest.approx(want_mlm, rel=1e-5)
  assert metrics["nsp_loss"] == pytest.approx(want_nsp, rel=1e-5)
  assert metrics["loss"] == pytest.approx(want_mlm + want_nsp, rel=1e-5)
  assert 0 <= metrics["mlm_accuracy"] <= 1 and 0 <= metrics["nsp_accuracy"] <= 1
  with pytest.raises(ValueError, match="missing"):
    bert.mlm_nsp_loss(Encoder(cfg), params, {k: v for k, v in batch.items() if k != "masked_lm_ids"})


def _loss_and_grads(cfg, mesh, params, batch, deterministic):
  model = Encoder(cfg, mesh)
  abstract, specs = state_lib.abstract_state(model, optax.sgd(0.1), bert.model_args(batch))
  p_sh = sharding.logical_to_sharding(specs.params, mesh, abstract.params)
  b_sh = sharding.batch_sharding(mesh)
  params = jax.device_put(params, p_sh)
  batch = jax.device_put(batch, b_sh)

  def f(p, b):
    loss_sum, aux = bert.mlm_nsp_loss(model, p, b, deterministic=deterministic,
                                      rngs=None if deterministic else {"dropout": jax.random.key(3)})
    return loss_sum / aux["weight"]
  fn = jax.jit(jax.value_and_grad(f), in_shardings=(p_sh, b_sh),
               out_shardings=(sharding.replicated(mesh), p_sh))
  loss, grads = fn(params, batch)
  return float(loss), jax.device_get(grads)


@pytest.mark.parametrize("options,deterministic", [
    ({}, True),
    ({"pre_norm": True, "dropout": 0.1}, False)],
    ids=["post-ln", "pre-ln-dropout"])
def test_mesh_equivalence(options, deterministic):
  cfg = config.ModelConfig(**{**CFG, **options})
  one = sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])
  batch = _batch()
  params = _init(cfg, batch)
  ref_loss, ref_grads = _loss_and_grads(cfg, one, params, batch, deterministic)
  for name, mesh_cfg in MESHES.items():
    mesh = sharding.make_mesh(mesh_cfg)
    loss, grads = _loss_and_grads(cfg, mesh, params, batch, deterministic)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, err_msg=name)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
      np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7,
                                 err_msg=f"{name} {jax.tree_util.keystr(path)}")
