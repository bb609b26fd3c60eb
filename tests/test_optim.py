"""Optimizer: schedules, weight-decay mask, and gradient accumulation."""

import jax
import numpy as np
import optax

from bigmodel import config, optim, sharding
from bigmodel.config import MeshConfig, OptimConfig
from bigmodel.train.loop import Components


def test_schedule_warmup_then_cosine():
  lr = optim.schedule(OptimConfig(learning_rate=1.0, warmup_steps=10, decay="cosine",
                                  end_lr_fraction=0.1), 110)
  assert float(lr(0)) == 0.0
  np.testing.assert_allclose(float(lr(5)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(lr(10)), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(lr(110)), 0.1, rtol=1e-5)
  lin = optim.schedule(OptimConfig(learning_rate=2.0, warmup_steps=0, decay="linear",
                                   end_lr_fraction=0.0), 100)
  np.testing.assert_allclose(float(lin(50)), 1.0, rtol=1e-6)


def test_decay_mask_excludes_norms_and_biases():
  params = {"blocks": {"layers": {"ln1": {"scale": np.ones(3), "bias": np.ones(3)},
                                  "attn": {"qkv": np.ones((3, 3)), "qkv_bias": np.ones((3,))}}},
            "embed": {"embedding": np.ones((5, 3))}, "final_norm": {"scale": np.ones(3)}}
  mask = optim.decay_mask(params)
  assert mask["blocks"]["layers"]["attn"]["qkv"] and mask["embed"]["embedding"]
  assert not mask["blocks"]["layers"]["ln1"]["scale"] and not mask["blocks"]["layers"]["ln1"]["bias"]
  assert not mask["blocks"]["layers"]["attn"]["qkv_bias"] and not mask["final_norm"]["scale"]


def _exp(corpus, micro):
  from tests.helpers import tiny_experiment
  return tiny_experiment(corpus, batch=16, **{"TrainConfig.microbatches": micro,
                                              "ModelConfig.dropout": 0.0})


def test_gradient_accumulation_equals_big_batch(text_corpus):
  from bigmodel.data.lm import LMData, global_iterator
  results = {}
  for k in (1, 4):
    exp = _exp(text_corpus, k)
    exp = __import__("dataclasses").replace(exp, mesh=MeshConfig(data=2, fsdp=2, tensor=2))
    mesh = sharding.make_mesh(exp.mesh)
    comp = Components.build(exp, mesh)
    state = comp.init_state(jax.random.key(0))
    data = LMData.build(exp.data)
    batch = next(global_iterator(data.train_batches(16), sharding.batch_sharding(mesh)))
    step = comp.train_step()
    state, m1 = step(state, batch)
    state, m2 = step(state, batch)
    results[k] = (jax.device_get(state.params), float(m1["loss"]), float(m2["loss"]),
                  float(m1["grad_norm"]))
  (p1, a1, b1, g1), (p4, a4, b4, g4) = results[1], results[4]
  np.testing.assert_allclose([a4, b4, g4], [a1, b1, g1], rtol=1e-5)
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p4)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)   # Adam amplifies float noise of ~0 grads


def test_unknown_optimizer():
  import pytest
  with pytest.raises(config.ConfigError, match="adamw, adafactor, lamb or sgd"):
    optim.make(OptimConfig(name="sgdx"), 10)
  for name in ("adamw", "adafactor", "lamb"):
    tx, _ = optim.make(OptimConfig(name=name), 10)
    assert isinstance(tx, optax.GradientTransformation)
