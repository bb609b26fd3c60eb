"""Metric writers: metrics.jsonl, TensorBoard event files, and a console line with rate and ETA.

Only process 0 writes; other processes get a writer that does nothing. Both files go
through `bigmodel.storage`, so a gs:// workdir works: there metrics.jsonl is rewritten at
most every `flush_secs` (object stores cannot append), and TensorBoard events go through
a writer factory that tensorboardX looks up by URL scheme (registered, process-wide, by
the first MetricWriter on that scheme).
"""

from __future__ import annotations

import json
import math
import time

import jax
from rich.console import Console

from bigmodel import storage


class _StorageEventFiles:
  """tensorboardX writer factory: event files as `storage.AppendFile`s."""

  def __init__(self, flush_secs: float):
    self.flush_secs = flush_secs

  def open(self, path):
    return storage.AppendFile(path, binary=True, flush_secs=self.flush_secs)

  def directory_check(self, path):
    storage.makedirs(path)


def _tensorboard(logdir: str, flush_secs: float):
  from tensorboardX import SummaryWriter, record_writer
  if storage.is_remote(logdir):
    record_writer.register_writer_factory(logdir.split("://")[0], _StorageEventFiles(flush_secs))
  return SummaryWriter(logdir)


def _fmt_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


class MetricWriter:
  def __init__(self, workdir: str, total_steps: int, enabled: bool | None = None,
               flush_secs: float = 10.0):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.total_steps = total_steps
    self.start = time.time()
    self._jsonl = None
    self._tb = None
    self._console = Console(highlight=False, soft_wrap=True)
    if self.enabled:
      storage.makedirs(workdir)
      self._jsonl = storage.AppendFile(storage.join(workdir, "metrics.jsonl"), flush_secs=flush_secs)
      self._tb = _tensorboard(storage.join(workdir, "tensorboard"), flush_secs)

  def write(self, record: dict) -> None:
    """One JSON object per call; scalars also go to TensorBoard, under `split/`."""
    if not self.enabled:
      return
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    step = int(record["step"])
    prefix = record.get("split", "train")
    for key, value in record.items():
      if key not in ("step", "split") and isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(f"{prefix}/{key}", value, step)
    self._tb.flush()

  def console(self, step: int, record: dict, first_step: int) -> None:
    if not self.enabled:
      return
    elapsed = time.time() - self.start
    done = step - first_step
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (self.total_steps - step) / rate if rate > 0 else 0.0
    parts = [f"step {step}/{self.total_steps}"]
    for key, fmt in (("loss", "{:.4f}"), ("learning_rate", "lr {:.2e}"), ("grad_norm", "gnorm {:.2f}"),
                     ("tokens_per_sec", "{:,.0f} tok/s"), ("mfu", "MFU {:.1%}"),
                     ("dp_epsilon", "eps {:.2f}")):
      if key in record:
        parts.append((fmt if "{" in fmt and " " in fmt else key + " " + fmt).format(record[key]))
    parts.append(f"{rate:.1f} steps/s, ETA {_fmt_duration(eta)}")
    self._console.print(" | ".join(parts))

  def close(self):
    if self._jsonl:
      self._jsonl.close()
    if self._tb:
      self._tb.close()
