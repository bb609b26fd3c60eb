"""Sums of a function over the leading axis of its input, one slice at a time in a `lax.scan`:
gradient accumulation over microbatches (train step), eval over microbatches (eval step), and
DP-SGD's per-example gradients on XLA:CPU (train/dp.py). One slice's intermediates live at a
time; the running sum starts at zeros of the function's output shapes."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp


def scan_sum(fn: Callable[[Any], Any], xs) -> Any:
  """sum_i fn(xs[i]) over the leading axis of every leaf of `xs`, added in order i = 0, 1, ..."""
  first = jax.tree.map(lambda x: x[0], xs)
  init = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(fn, first))
  total, _ = jax.lax.scan(lambda carry, x: (jax.tree.map(jnp.add, carry, fn(x)), None), init, xs)
  return total
