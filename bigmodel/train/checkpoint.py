"""Checkpoints through orbax's CheckpointManager: async saves, keep-N, exact resume.

A checkpoint holds two items: `state` (params, optimizer state, step), restored
straight onto the current mesh's shardings (so a different mesh works), and
`meta` (JSON: the data position and the run's identity). Before restoring, the
stored shapes are checked against the model so that a workdir of another model
fails with a clear message instead of being overwritten.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  pass


def _flat(tree) -> dict[str, Any]:
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    out["/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)] = leaf
  return out


def shapes(tree) -> dict[str, tuple]:
  """'params/blocks/.../kernel' -> shape, for every array (or abstract array) in a tree."""
  return {k: tuple(v.shape) for k, v in _flat(tree).items() if hasattr(v, "shape")}


def shape_problems(got: dict[str, tuple], want: dict[str, tuple], limit: int = 8) -> list[str]:
  """Lines naming every difference between stored (`got`) and model (`want`) shapes."""
  order = sorted(want, key=lambda k: (not k.startswith("params/"), k))   # params first
  problems = [f"  {k}: checkpoint {got[k]} vs model {want[k]}"
              for k in order if k in got and got[k] != want[k]]
  if len(problems) > limit:
    problems = problems[:limit] + [f"  ... and {len(problems) - limit} more"]
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  if missing:
    problems.append(f"  missing from the checkpoint: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
  if extra:
    problems.append(f"  not in the model: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
  return problems


class Checkpointer:
  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def check_compatible(self, step: int, abstract_state) -> None:
    """Raises CheckpointError if the stored tree differs from `abstract_state` in keys or shapes."""
    try:
      stored = self.manager.item_metadata(step)["state"]
    except Exception as e:
      raise CheckpointError(f"checkpoint {self.directory} step {step} is unreadable ({e}); it may "
                            f"be corrupt: move it aside to restart from an earlier step") from None
    if stored is None:
      return
    problems = shape_problems(shapes(stored), shapes(abstract_state))
    if problems:
      raise CheckpointError(
          f"the checkpoint in {self.directory} (step {step}) does not match this model:\n"
          + "\n".join(problems) +
          "\nIt was written by a different model configuration. Use a new --workdir, or the "
          "config that wrote it (its config.gin).")

  def restore(self, step: int, abstract_state) -> tuple[Any, dict]:
    """(state on the shardings of `abstract_state`, meta)."""
    self.check_compatible(step, abstract_state)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:
      raise CheckpointError(f"could not restore {self.directory} step {step}: {e}. The checkpoint "
                            f"may be corrupt: move that step's folder aside to resume from an "
                            f"earlier one.") from None
    return restored["state"], dict(restored["meta"] or {})

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()

