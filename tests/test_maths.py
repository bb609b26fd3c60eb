"""The maths of training (experiments/maths/, README "The maths of training"): each recipe
trains on the shared trainer in-process and lands on the answer known in closed form."""

import os

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from bigmodel import config, models
from bigmodel.data import maths as maths_data
from bigmodel.objectives import maths
from bigmodel.train import hooks, loop

MATHS = os.path.join(os.path.dirname(__file__), "..", "experiments", "maths")


class _Keep(hooks.Hook):
  """The run's final params and validation record, as the trainer ends."""

  def end(self, run):
    self.params = jax.device_get(run.state.params)
    self.record = run.eval_record


def _train(recipe, tmp_path, *bindings):
  exp = config.load([os.path.join(MATHS, recipe)], ["EVAL_EVERY = 0", *bindings])
  keep = _Keep()
  summary = loop.train(exp, str(tmp_path / recipe.removesuffix(".gin")), hooks=[keep])
  return exp, {**summary, **keep.record}, keep.params


def _with_ones(x):
  return np.concatenate([x, np.ones((len(x), 1))], 1).astype(np.float64)


def test_linear_regression_by_gradient_descent_reaches_lstsq(tmp_path):
  exp, summary, params = _train("linear_regression.gin", tmp_path, "TRAIN_STEPS = 60")
  x, y = maths_data.generate("regression", 256, 4, 0, 0.1)
  lstsq = np.linalg.lstsq(_with_ones(x), y.astype(np.float64), rcond=None)[0]
  gd = np.asarray(maths.flat_linear(params), np.float64)
  assert np.abs(gd - lstsq).max() < 1e-4, (gd, lstsq)
  assert summary["step"] == 60 and summary["validation_loss"] < 0.02     # the noise floor, 0.1^2
  assert summary["param_err"] < 1e-4                            # the eval line's param_err


def test_logistic_regression_reaches_newton_and_bce_matches_optax(tmp_path):
  exp, summary, params = _train("logistic_regression.gin", tmp_path, "TRAIN_STEPS = 120")
  x, y = maths_data.generate("logistic", 256, 3, 0, 0.1)
  newton = np.asarray(maths.newton_logistic(jnp.asarray(x), jnp.asarray(y)), np.float64)
  p = 1 / (1 + np.exp(-_with_ones(x) @ newton))                   # the optimum: gradient 0
  assert np.abs(_with_ones(x).T @ (p - y) / len(y)).max() < 1e-5
  gd = np.asarray(maths.flat_linear(params), np.float64)
  assert np.abs(gd - newton).max() < 1e-4 and summary["param_err"] < 1e-4, (gd, newton)
  # the BCE equals optax's, and it and its gradient stay finite at logits +-100
  z = jnp.array([-100.0, -30.0, -1.5, 0.0, 0.3, 2.0, 30.0, 100.0])
  for label in (0.0, 1.0, 0.25):
    lab = jnp.full_like(z, label)
    np.testing.assert_allclose(maths.bce(z, lab), optax.sigmoid_binary_cross_entropy(z, lab),
                               rtol=1e-6, atol=1e-6)
    grad = jax.grad(lambda v: maths.bce(v, lab).sum())(z)
    assert np.isfinite(maths.bce(z, lab)).all() and np.isfinite(grad).all()
  assert float(maths.bce(jnp.array(100.0), 0.0)) == pytest.approx(100.0)


def _mlp_loss64(flat, unravel, x, y):
  p = unravel(flat)
  h = np.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
  return float(np.sum((h @ p["out"]["kernel"][:, 0] + p["out"]["bias"][0] - y) ** 2))


def test_backprop_equals_chain_rule_and_finite_differences(tmp_path):
  exp, result, params = _train("backprop.gin", tmp_path, "TRAIN_STEPS = 20")
  assert result["grad_err"] < 1e-5 and result["step"] == 20      # the eval line's grad_err
  x, y = maths_data.generate("mlp", 256, 4, 0, 0.1)
  x, y = x[:32], y[:32]
  model = models.build("mlp", exp.model)
  auto = jax.jit(jax.grad(lambda p: jnp.sum((model.apply({"params": p}, x)[:, 0] - y) ** 2)))(params)
  hand = maths.mlp_grads_by_hand(params, jnp.asarray(x), jnp.asarray(y), jnp.ones(32))
  flat_auto, unravel = jax.flatten_util.ravel_pytree(auto)
  flat_hand, _ = jax.flatten_util.ravel_pytree(hand)
  scale = np.abs(flat_hand).max()
  assert np.abs(flat_auto - flat_hand).max() < 1e-5 * scale
  # central finite differences of the loss, in float64
  leaves, tree = jax.tree.flatten(jax.tree.map(lambda a: np.asarray(a, np.float64), params))
  flat = np.concatenate([a.ravel() for a in leaves])     # ravel_pytree's order, kept in float64
  ends = np.cumsum([a.size for a in leaves])[:-1]
  unravel64 = lambda v: jax.tree.unflatten(tree, [c.reshape(a.shape) for c, a in
                                                  zip(np.split(v, ends), leaves)])
  x64, y64, eps = x.astype(np.float64), y.astype(np.float64), 1e-6
  fd = np.array([(_mlp_loss64(flat + eps * e, unravel64, x64, y64) -
                  _mlp_loss64(flat - eps * e, unravel64, x64, y64)) / (2 * eps)
                 for e in np.eye(len(flat))])
  assert np.abs(fd - np.asarray(flat_auto)).max() < 1e-4 * scale
  assert not isinstance(params["hidden"]["kernel"], nn.Partitioned)
