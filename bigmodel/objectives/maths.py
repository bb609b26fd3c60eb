"""The maths of training as experiments (experiments/maths/, README "The maths of training"):
three small objectives on the shared trainer whose answers are known in closed form.

  linear_regression    model `linear`, mean squared error: plain gradient descent must reach
                       the least-squares solution (numpy.linalg.lstsq of the same data)
  logistic_regression  model `linear`, binary cross-entropy (`bce`, checked against
                       optax.sigmoid_binary_cross_entropy): gradient descent must reach the
                       optimum that Newton's method (`newton_logistic`) finds
  mlp_regression       model `mlp` (two layers, tanh), mean squared error: `jax.grad` must
                       equal the chain rule written out by hand (`mlp_grads_by_hand`)

Rows come from bigmodel/data/maths.py: x float32 [b, f] (f = DataConfig.seq_len, the number
of features), y float32 [b], weights float32 [b], and `reference` float32 [b, p]: the known
answer (flattened [kernel, bias]; zeros for the MLP) repeated on every row. Losses are sum-reduced; the eval
sums add what the experiment checks:
  param_err  max |params - reference| (linear and logistic regression)
  grad_err   max |jax.grad - chain rule by hand| / max |chain rule by hand| (mlp; eval only)
"""

from __future__ import annotations

import dataclasses

import gin
import jax
import jax.numpy as jnp


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MathsConfig:
  """The generated data set of a maths experiment (DataConfig.seq_len: features per row;
  DataConfig.seed: the draw)."""
  num_examples: int = 256          # rows (a batch of all of them: full-batch gradient descent)
  noise: float = 0.1               # regression targets: Gaussian noise of this std


def model_args(batch):
  return (batch["x"],)


def example_batch(batch_size: int, seq_len: int) -> dict:
  return {"x": jnp.zeros((batch_size, seq_len), jnp.float32),
          "y": jnp.zeros((batch_size,), jnp.float32),
          "reference": jnp.zeros((batch_size, seq_len + 1), jnp.float32),
          "weights": jnp.ones((batch_size,), jnp.float32)}


def build_data(kind: str):
  def build(cfg, tokenizer=None):
    from bigmodel.data import maths as maths_data   # the pipeline (TensorFlow) only when used
    return maths_data.MathsData.build(cfg, kind)
  return build


# ----------------------------------------------------------------------------- the maths


def bce(logits, labels):
  """Binary cross-entropy of sigmoid(logits) against labels in [0, 1], per element, in the
  form that never overflows: max(z, 0) - z y + log(1 + exp(-|z|)) (finite at z = +-100)."""
  z = logits.astype(jnp.float32)
  return jnp.maximum(z, 0.0) - z * labels + jnp.log1p(jnp.exp(-jnp.abs(z)))


def newton_logistic(x, y, steps: int = 25):
  """The logistic-regression optimum by Newton's method: theta <- theta - H^-1 g on the mean
  BCE of sigmoid([x, 1] theta); returns theta = [w, b] (float32 [f + 1])."""
  x1 = jnp.concatenate([x, jnp.ones((x.shape[0], 1), x.dtype)], axis=1)
  theta = jnp.zeros(x1.shape[1], x.dtype)
  for _ in range(steps):
    p = jax.nn.sigmoid(x1 @ theta)
    g = x1.T @ (p - y) / len(y)
    h = (x1.T * (p * (1 - p))) @ x1 / len(y)
    theta = theta - jnp.linalg.solve(h, g)
  return theta


def flat_linear(params):
  """[kernel[:, 0], bias]: the order of `reference`."""
  p = params["linear"]
  return jnp.concatenate([p["kernel"][:, 0], p["bias"]])


def mlp_forward(params, x):
  h = jnp.tanh(x @ params["hidden"]["kernel"] + params["hidden"]["bias"])
  return (h @ params["out"]["kernel"] + params["out"]["bias"])[:, 0], h


def mlp_grads_by_hand(params, x, y, w):
  """d/dparams of sum_i w_i (f(x_i) - y_i)^2 for f(x) = tanh(x W1 + b1) W2 + b2, by the chain
  rule: dout = 2 w r, dW2 = h^T dout, db2 = sum dout, dz = (dout W2^T) (1 - h^2), dW1 = x^T dz,
  db1 = sum dz."""
  out, h = mlp_forward(params, x)
  dout = 2.0 * w * (out - y)                                   # [b]
  dz = dout[:, None] * params["out"]["kernel"][:, 0][None, :] * (1.0 - h * h)   # [b, H]
  return {"hidden": {"kernel": x.T @ dz, "bias": dz.sum(0)},
          "out": {"kernel": (h.T @ dout)[:, None], "bias": dout.sum()[None]}}


# ----------------------------------------------------------------------------- losses


def _apply(model, params, batch):
  return model.apply({"params": params}, batch["x"]).astype(jnp.float32)[:, 0]


def _param_err(params, batch, w):
  err = jnp.max(jnp.abs(flat_linear(params) - batch["reference"][0]))
  return jnp.sum(w) * err          # summed over rows: summarize divides by the weight


def linear_regression_loss(model, params, batch, *, deterministic=True, rngs=None):
  w = batch["weights"].astype(jnp.float32)
  r = _apply(model, params, batch) - batch["y"]
  return jnp.sum(w * r * r), {"weight": jnp.sum(w), "param_err": _param_err(params, batch, w)}


def logistic_regression_loss(model, params, batch, *, deterministic=True, rngs=None):
  w = batch["weights"].astype(jnp.float32)
  logits = _apply(model, params, batch)
  correct = jnp.sum(w * ((logits > 0) == (batch["y"] > 0.5)))
  return jnp.sum(w * bce(logits, batch["y"])), {
      "weight": jnp.sum(w), "correct": correct, "param_err": _param_err(params, batch, w)}


def mlp_regression_loss(model, params, batch, *, deterministic=True, rngs=None):
  w = batch["weights"].astype(jnp.float32)
  r = _apply(model, params, batch) - batch["y"]
  aux = {"weight": jnp.sum(w)}
  if deterministic:   # evaluation: backpropagation against the chain rule by hand
    auto = jax.grad(lambda p: jnp.sum(w * (_apply(model, p, batch) - batch["y"]) ** 2))(params)
    hand = mlp_grads_by_hand(params, batch["x"], batch["y"], w)
    diff = jnp.max(jnp.stack([jnp.max(jnp.abs(a - b)) for a, b in
                              zip(jax.tree.leaves(auto), jax.tree.leaves(hand))]))
    scale = jnp.max(jnp.stack([jnp.max(jnp.abs(b)) for b in jax.tree.leaves(hand)]))
    aux["grad_err"] = jnp.sum(w) * diff / jnp.maximum(scale, 1e-12)
  return jnp.sum(w * r * r), aux


def summarize(sums: dict) -> dict:
  weight = max(float(sums["weight"]), 1.0)
  out = {k: float(sums[k]) / weight for k in ("param_err", "grad_err", "correct") if k in sums}
  if "correct" in out:
    out["accuracy"] = out.pop("correct")
  if "loss_sum" in sums:
    out["loss"] = float(sums["loss_sum"]) / weight
  return out
