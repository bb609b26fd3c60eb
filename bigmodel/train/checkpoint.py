"""Checkpoints through orbax's CheckpointManager: async saves, keep-N, exact resume.

A checkpoint holds two items: `state` (params, optimizer state, step), restored
straight onto the current mesh's shardings (so a different mesh works), and
`meta` (JSON: the data position and the run's identity). Before restoring, the
stored shapes are checked against the model so that a workdir of another model
fails with a clear message instead of being overwritten.

The directory may be local or an object-store URL (`gs://bucket/run/checkpoints`):
orbax reaches it through `bigmodel.storage`'s settings (epath over fsspec, tensorstore).

Resuming takes the newest checkpoint that restores: a corrupt or partial one (its
files damaged, its metadata unreadable) is named in a warning, set aside under
`checkpoints.bad/STEP` (so a later save of that step does not collide with it, and
nothing is deleted), and the one before it is tried. The run's identity (`run_identity`:
what fixes the data order and the model's shapes) is stored in `meta["run"]`;
`check_run` refuses a resume that changes it unless the field is allowed explicitly.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Any, Sequence

import jax
import orbax.checkpoint as ocp

from bigmodel import storage

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
    self.directory = storage.absolute(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(
        storage.epath(self.directory), options=options,
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

  def restore_latest(self, abstract_state) -> tuple[Any, dict, int] | None:
    """(state, meta, step) of the newest checkpoint that restores; None when there is none.

    A checkpoint whose files or metadata cannot be read is skipped with a warning and listed
    in `self.unusable` (`set_aside_unusable()` moves them once the caller has decided to go
    on). A checkpoint of another model (shapes differ) is not skipped: that raises, as
    `check_compatible` does. Raises CheckpointError naming every step tried when none restores.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    bad = self.unusable = []
    for step in steps:
      try:
        state, meta = self.restore(step, abstract_state)
      except CheckpointError as e:
        if "does not match this model" in str(e):
          raise
        log.warning("checkpoint %s step %d is unusable, trying the one before: %s",
                    self.directory, step, e)
        bad.append((step, str(e)))
        continue
      if bad:
        log.warning("resuming from step %d of %s: newer step(s) %s could not be restored",
                    step, self.directory, [b for b, _ in bad])
      return state, meta, step
    if bad:
      raise CheckpointError(
          f"no checkpoint in {self.directory} restores:\n" +
          "\n".join(f"  step {b}: {why}" for b, why in bad) +
          "\nThey may be corrupt or partly written. Move them aside to start afresh, or use a "
          "new --workdir.")
    return None

  def set_aside_unusable(self) -> None:
    """Moves the steps `restore_latest` skipped to `<directory>.bad/STEP-<time>` (process 0),
    so that the resumed run can save those steps again; all processes wait for it."""
    steps = [step for step, _ in getattr(self, "unusable", [])]
    if not steps:
      return
    if jax.process_index() == 0:
      for step in steps:
        src = storage.join(self.directory, str(step))
        dst = storage.join(self.directory + ".bad", f"{step}-{int(time.time())}")
        storage.move(src, dst)
        log.warning("moved the unusable checkpoint %s to %s", src, dst)
    if jax.process_count() > 1:
      ocp.multihost.sync_global_processes("bigmodel_set_aside_checkpoints")
    self.manager.reload()
    self.unusable = []

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()



# --- the run's identity: what fixes the data order and the model's shapes -----------------

IDENTITY_FIELDS = ("batch_size", "seq_len", "seed", "data_seed", "data", "vocab_size")

WHAT_HAPPENS = {
    "batch_size": "the batch at step i is drawn from the new batch size's order, so rows "
                  "between step x old batch and step x new batch are skipped or repeated",
    "seq_len": "rows are re-cut at the new length: the data position (step) now indexes a "
               "different packing of the token stream",
    "seed": "dropout and other step randomness follow the new seed from this step on",
    "data_seed": "the shuffle order changes: the batch at step i comes from the new order, so "
                 "some examples repeat and others are skipped",
    "data": "the data files differ: training continues at the same step of the new data's order",
    "vocab_size": "the embedding tables keep their stored shapes only if the model accepts them",
}


def data_fingerprint(files: Sequence[str]) -> str:
  """A short digest of the data files' names and sizes (not their bytes: a C4-sized corpus
  cannot be hashed at every start). Empty for TFDS or generated data."""
  entries = []
  for f in files:
    try:
      fs_size = _size(f)
    except (OSError, FileNotFoundError):
      fs_size = -1
    entries.append([storage.basename(f), fs_size])
  if not entries:
    return ""
  digest = hashlib.sha256(json.dumps(sorted(entries)).encode()).hexdigest()[:16]
  return f"{len(entries)} files, sha256:{digest}"


def _size(path: str) -> int:
  if storage.is_remote(path):
    fs, p = storage.filesystem(path)
    return int(fs.size(p))
  import os
  return os.path.getsize(path)


def _data_files(data_cfg) -> list[str]:
  from bigmodel.data import sources
  prepared = getattr(data_cfg, "prepared_dir", "")   # `bigmodel data prepare` shards: its index
  if prepared and storage.exists(storage.join(prepared, "index.json")):
    return [storage.join(prepared, "index.json")]
  try:
    return sources.resolve_files(list(data_cfg.files) + list(data_cfg.val_files),
                                 data_cfg.data_dir, allow_fallback=True) or []
  except sources.DataError:
    return []      # the data pipeline reports missing files with its own message


def run_identity(exp) -> dict:
  """What a resume must keep (IDENTITY_FIELDS); param shapes are checked from the
  checkpoint's own metadata (mesh-independent), see `check_compatible`."""
  data_files = _data_files(exp.data)
  return {"batch_size": exp.train.batch_size, "seq_len": exp.data.seq_len,
          "seed": exp.train.seed, "data_seed": exp.data.seed,
          "data": data_fingerprint(data_files), "vocab_size": exp.model.vocab_size}


def check_run(stored: dict | None, current: dict, allow_changed: Sequence[str] = (),
              where: str = "") -> list[str]:
  """Raises CheckpointError naming each changed field (old and new value) unless it is in
  `allow_changed`; returns the lines describing the changes that were allowed."""
  unknown = sorted(set(allow_changed) - set(IDENTITY_FIELDS))
  if unknown:
    raise CheckpointError(f"--allow_changed {','.join(unknown)}: unknown field(s); the fields "
                          f"are {', '.join(IDENTITY_FIELDS)}")
  if not stored:
    return []
  changed = [(k, stored[k], current.get(k)) for k in IDENTITY_FIELDS
             if k in stored and stored[k] != current.get(k)]
  refused = [c for c in changed if c[0] not in allow_changed]
  if refused:
    lines = "\n".join(f"  {k}: checkpoint {old!r}, now {new!r}" for k, old, new in refused)
    raise CheckpointError(
        f"resuming {where} with a changed configuration:\n{lines}\n"
        f"These fix the data order or the model's shapes; resuming with them changed would skip "
        f"or repeat examples. Use the run's config (its config.gin), a new --workdir, or accept "
        f"the change with --allow_changed={','.join(k for k, _, _ in refused)}.")
  return [f"{k} changed from {old!r} to {new!r} (--allow_changed): {WHAT_HAPPENS[k]}"
          for k, old, new in changed]


def resume(ckpt: Checkpointer, abstract_state, identity: dict,
           allow_changed: Sequence[str] = ()) -> tuple[Any, dict, int] | None:
  """(state, meta, step) to resume from, or None for a fresh run: the newest checkpoint that
  restores, whose run identity matches `identity` (or differs only in `allow_changed`,
  which is logged with what happens to the data position). Unusable newer steps are set
  aside only once the resume is accepted; on refusal nothing in the workdir changes."""
  try:
    restored = ckpt.restore_latest(abstract_state)
    if restored is None:
      check_run(None, identity, allow_changed)     # still reject unknown field names
      return None
    for line in check_run(restored[1].get("run"), identity, allow_changed,
                          f"{ckpt.directory} step {restored[2]}"):
      log.warning("%s", line)
    ckpt.set_aside_unusable()
  except Exception:
    ckpt.close()
    raise
  return restored


def restore_workdir(workdir: str, abstract_state) -> tuple[Any, dict, int]:
  """(state, meta, step) of the newest usable checkpoint in `workdir`, read-only (unusable
  steps stay where they are); a CheckpointError when there is none."""
  ckpt = Checkpointer(storage.join(workdir, "checkpoints"), async_save=False)
  try:
    restored = ckpt.restore_latest(abstract_state)
  finally:
    ckpt.close()
  if restored is None:
    raise CheckpointError(f"no checkpoint in {workdir}/checkpoints: train first")
  return restored
