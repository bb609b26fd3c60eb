"""Magnitude pruning (bigmodel/prune.py): schedule, global mask, masked updates."""

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bigmodel import config, optim, prune
from bigmodel.config import ConfigError, OptimConfig
from bigmodel.train import bad_steps


def _params(seed=0):
  k = jax.random.split(jax.random.key(seed), 4)
  return {"embed": {"embedding": jax.random.normal(k[0], (10, 4))},
          "layer": {"kernel": jax.random.normal(k[1], (4, 6)), "bias": jax.random.normal(k[2], (6,))},
          "head": {"kernel": 3.0 * jax.random.normal(k[3], (6, 2))}}


def test_schedule_is_zhu_gupta_cubic():
  cfg = prune.PruneConfig(sparsity=0.8, initial_sparsity=0.2, begin_step=10, end_step=30,
                          frequency=5)
  s = [float(prune.sparsity_at(cfg, t)) for t in (0, 10, 20, 30, 100)]
  np.testing.assert_allclose(s, [0.2, 0.2, 0.8 - 0.6 * 0.125, 0.8, 0.8], rtol=1e-6)
  steps = [t for t in range(40) if bool(prune.is_update_step(cfg, t))]
  assert steps == [10, 15, 20, 25, 30]
  cfg = prune.PruneConfig(sparsity=0.5, frequency=7).check(total_steps=20)
  assert cfg.end_step == 15 and bool(prune.is_update_step(cfg, 15))     # end always applies


def test_global_mask_prunes_the_smallest_magnitudes_across_leaves():
  params = _params()
  leaves = jax.tree.leaves(params)
  flags = prune.prunable(params)
  names = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  assert dict(zip(names, flags)) == {"['embed']['embedding']": False, "['head']['kernel']": True,
                                     "['layer']['bias']": False, "['layer']['kernel']": True}
  masks = prune.global_masks(leaves, flags, 0.5)
  kept = np.concatenate([np.abs(np.asarray(x))[np.asarray(m)].ravel()
                         for x, m in zip(leaves, masks) if m is not None])
  gone = np.concatenate([np.abs(np.asarray(x))[~np.asarray(m)].ravel()
                         for x, m in zip(leaves, masks) if m is not None])
  assert gone.size == 18 and kept.size == 18           # floor(0.5 * (24 + 12))
  assert gone.max() < kept.min()                        # one global threshold
  # the head's weights are 3x larger: a global threshold prunes it less than the layer
  head, layer = (float(np.mean(np.asarray(masks[i]))) for i in (1, 3))
  assert head > layer
  assert all(m is None for m, f in zip(masks, flags) if not f)
  none = prune.global_masks(leaves, flags, 0.0)
  assert all(bool(jnp.all(m)) for m in none if m is not None)


def test_pruned_weights_stay_zero_and_sparsity_reaches_the_target():
  params = _params(1)
  cfg = prune.PruneConfig(sparsity=0.75, begin_step=0, end_step=6, frequency=3)
  tx = optax.chain(optax.adam(0.05), prune.transform(cfg))
  state = tx.init(params)
  target = jax.tree.map(jnp.ones_like, params)        # pulls every weight away from 0

  @jax.jit
  def step(params, state):
    grads = jax.grad(lambda p: sum(jnp.sum((a - b) ** 2) for a, b in
                                   zip(jax.tree.leaves(p), jax.tree.leaves(target))))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  zero_before = None
  for t in range(12):
    params, state = step(params, state)
    rep = prune.sparsity(params)
    if t == 3:
      zero_before = [np.asarray(x) == 0 for x in jax.tree.leaves(params)]
      assert 0 < rep["prunable_sparsity"] < 0.75
    if t > 3:    # once pruned, a weight stays exactly 0 (the mask only grows)
      now = [np.asarray(x) == 0 for x in jax.tree.leaves(params)]
      assert all(np.all(n[b]) for n, b in zip(now, zero_before))
  assert rep["prunable_sparsity"] == pytest.approx(27 / 36)     # floor(0.75 * 36) = 27
  assert not np.any(np.asarray(params["embed"]["embedding"]) == 0)   # never pruned
  assert not np.any(np.asarray(params["layer"]["bias"]) == 0)


def _prune_states(tx):
  return [s for s in jax.tree.leaves(tx.init(_params()),
                                     is_leaf=lambda x: isinstance(x, prune.PruneState))
          if isinstance(s, prune.PruneState)]


def test_optim_make_adds_pruning_from_its_config_and_checks_it():
  gin.clear_config()
  try:
    assert not _prune_states(optim.make(OptimConfig(), 100)[0])
    assert not _prune_states(optim.make(OptimConfig(), 100, prune.PruneConfig())[0])   # sparsity 0
    gin.bind_parameter("PruneConfig.sparsity", 0.5)     # gin is not read here: Experiment.prune is
    assert not _prune_states(optim.make(OptimConfig(), 100)[0])
    assert len(_prune_states(optim.make(OptimConfig(), 100, prune.PruneConfig(sparsity=0.5))[0])) == 1
    with pytest.raises(ConfigError, match="end_step"):
      optim.make(OptimConfig(), 100, prune.PruneConfig(sparsity=0.5, end_step=100))
    with pytest.raises(ConfigError, match="sparsity"):
      optim.make(OptimConfig(), 100, prune.PruneConfig(sparsity=1.0))
  finally:
    gin.clear_config()


def test_config_load_reads_prune_bindings_only_when_given():
  base = ["TrainConfig.train_steps=10", "TrainConfig.batch_size=2", "ModelConfig.vocab_size=32"]
  try:
    exp = config.load(bindings=base + ["PruneConfig.sparsity=0.5", "PruneConfig.frequency=2"])
    assert exp.prune == prune.PruneConfig(sparsity=0.5, frequency=2)   # no "never read" error
    assert "PruneConfig.frequency = 2" in config.operative_config()    # recorded in config.gin
    assert len(_prune_states(bad_steps.make_optimizer(exp)[0])) == 1   # the run's optimizer
    assert config.load(bindings=base).prune is None
    assert "PruneConfig" not in config.operative_config()   # other runs' config.gin unchanged
  finally:
    gin.clear_config()
