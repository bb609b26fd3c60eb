"""The models of the maths experiments (bigmodel/objectives/maths.py): x float32 [b, f] ->
float32 [b, 1].

  Linear  y = x W + b                          (params linear/{kernel [f, 1], bias [1]})
  MLP     y = tanh(x W1 + b1) W2 + b2, width ModelConfig.d_model
                                               (params hidden/{kernel, bias}, out/{kernel, bias})
"""

from __future__ import annotations

from flax import linen as nn
import jax.numpy as jnp

from bigmodel.config import ModelConfig
from bigmodel.models.encoder import Dense


class Linear(nn.Module):
  cfg: ModelConfig
  mesh: object = None

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    return Dense(1, self.cfg, axes=("embed", "classes"), name="linear")(x)


class MLP(nn.Module):
  cfg: ModelConfig
  mesh: object = None

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    h = jnp.tanh(Dense(self.cfg.d_model, self.cfg, axes=("embed", "mlp"), name="hidden")(x))
    return Dense(1, self.cfg, axes=("mlp", "classes"), name="out")(h)
