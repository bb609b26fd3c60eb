"""Frozen parameters (`OptimConfig.frozen_params`): named leaves that training leaves alone.

Each pattern is a regular expression matched in full against a leaf's path, its dict keys joined
by "/" (`embed/embedding` is an encoder's or decoder's word-embedding table, `pos_embed/.*` its
learned positions, `blocks/layers/.*` every scanned block). A frozen leaf gets no gradient (the
train step differentiates the loss with respect to the other leaves only, so the backward pass
never forms its weight gradient), no DP noise, no optimizer state and a zero update: it stays
bitwise what initialization or `TrainConfig.init_checkpoint` gave it.

Under DP-SGD this is the usual way to cut the cost of per-example gradients: MiniLM's word
embedding is 11.7M of its 22.7M params, and a per-example gradient of it is a dense
[30,522 x 384] table per example (README "Private training" has the measured step times).
"""

from __future__ import annotations

import re
from typing import Sequence

import jax.numpy as jnp
import optax

from bigmodel.config import ConfigError


def _is_node(value) -> bool:
  return isinstance(value, dict) or hasattr(value, "items")


def _matcher(patterns: Sequence[str]):
  try:
    compiled = [re.compile(p) for p in patterns]
  except re.error as e:
    raise ConfigError(f"OptimConfig.frozen_params={tuple(patterns)!r}: {e}; give regular "
                      f"expressions over '/'-joined param paths, e.g. 'embed/embedding'") from None
  return lambda path: any(c.fullmatch(path) for c in compiled)


def trainable(tree, patterns: Sequence[str], prefix: str = "") -> dict:
  """The sub-tree (nested dicts) of the leaves no pattern matches, empty dicts dropped."""
  frozen = _matcher(patterns)
  def select(node, prefix):
    out = {}
    for key, value in node.items():
      path = f"{prefix}{key}"
      if _is_node(value):
        sub = select(value, path + "/")
        if sub:
          out[key] = sub
      elif not frozen(path):
        out[key] = value
    return out
  return select(tree, prefix)


def frozen_paths(tree, patterns: Sequence[str]) -> list[str]:
  """The '/'-joined paths of the leaves the patterns freeze."""
  frozen, out = _matcher(patterns), []
  def walk(node, prefix):
    for key, value in node.items():
      path = f"{prefix}{key}"
      if _is_node(value):
        walk(value, path + "/")
      elif frozen(path):
        out.append(path)
  walk(tree, "")
  return out


def fill(full, part, fill_leaf=jnp.zeros_like) -> dict:
  """`full`'s tree with `part`'s leaves where `part` has them, else `fill_leaf(full's leaf)`."""
  out = {}
  for key, value in full.items():
    if key in part and not _is_node(part[key]):
      out[key] = part[key]
    elif _is_node(value):
      out[key] = fill(value, part.get(key, {}), fill_leaf)
    else:
      out[key] = fill_leaf(value)
  return out


def check(params, patterns: Sequence[str]) -> list[str]:
  """The frozen paths, or a ConfigError when a pattern freezes nothing or everything."""
  if not patterns:
    return []
  for p in patterns:
    if not frozen_paths(params, [p]):
      raise ConfigError(f"OptimConfig.frozen_params: {p!r} matches no parameter path; paths look "
                        f"like {_some_paths(params)} (a regular expression matched in full)")
  if not trainable(params, patterns):
    raise ConfigError(f"OptimConfig.frozen_params={tuple(patterns)!r} freezes every parameter")
  return frozen_paths(params, patterns)


def _some_paths(params, n: int = 4) -> list[str]:
  out = []
  def walk(node, prefix):
    for key, value in node.items():
      if len(out) >= n:
        return
      if _is_node(value):
        walk(value, f"{prefix}{key}/")
      else:
        out.append(f"{prefix}{key}")
  walk(params, "")
  return out


def freeze(inner: optax.GradientTransformation, patterns: Sequence[str]):
  """`inner` on the unfrozen leaves only (its state holds nothing for the frozen ones); the
  frozen leaves' updates are zeros."""
  def init(params):
    return inner.init(trainable(params, patterns))

  def update(grads, state, params=None):
    sub_params = None if params is None else trainable(params, patterns)
    updates, state = inner.update(trainable(grads, patterns), state, sub_params)
    return fill(grads, updates), state

  return optax.GradientTransformation(init, update)
