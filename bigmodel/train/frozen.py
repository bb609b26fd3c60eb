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

import optax

from bigmodel.config import ConfigError
from bigmodel.models import lora


def _matcher(patterns: Sequence[str]):
  try:
    compiled = [re.compile(p) for p in patterns]
  except re.error as e:
    raise ConfigError(f"OptimConfig.frozen_params={tuple(patterns)!r}: {e}; give regular "
                      f"expressions over '/'-joined param paths, e.g. 'embed/embedding'") from None
  return lambda path: any(c.fullmatch(path) for c in compiled)


def trainable(tree, patterns: Sequence[str]) -> dict:
  """The sub-tree (nested dicts) of the leaves no pattern matches, empty dicts dropped."""
  frozen = _matcher(patterns)
  return lora.select(tree, lambda path, node: not node and not frozen(path))


def _paths(tree, prefix: str = "") -> list[str]:
  """The '/'-joined paths of the tree's leaves, in its order."""
  out = []
  for key, value in tree.items():
    path = f"{prefix}{key}"
    out.extend(_paths(value, path + "/") if lora.is_node(value) else [path])
  return out


def frozen_paths(tree, patterns: Sequence[str]) -> list[str]:
  """The '/'-joined paths of the leaves the patterns freeze."""
  frozen = _matcher(patterns)
  return [p for p in _paths(tree) if frozen(p)]


def check(params, patterns: Sequence[str]) -> list[str]:
  """The frozen paths, or a ConfigError when a pattern freezes nothing or everything."""
  if not patterns:
    return []
  for p in patterns:
    if not frozen_paths(params, [p]):
      raise ConfigError(f"OptimConfig.frozen_params: {p!r} matches no parameter path; paths look "
                        f"like {_paths(params)[:4]} (a regular expression matched in full)")
  if not trainable(params, patterns):
    raise ConfigError(f"OptimConfig.frozen_params={tuple(patterns)!r} freezes every parameter")
  return frozen_paths(params, patterns)


def freeze(inner: optax.GradientTransformation, patterns: Sequence[str]):
  """`inner` on the unfrozen leaves only (its state holds nothing for the frozen ones); the
  frozen leaves' updates are zeros (the mechanism of LoRA's frozen base, lora.freeze)."""
  return lora.freeze(inner, lambda tree: trainable(tree, patterns))
