"""What runs around the jitted step: the run's state (`Run`), its clock (`Timer`), and hooks.

The loop (`loop.run_steps`) is: next batch (already on device), step, then every hook whose
time has come; after the loop, each hook's `end`. A hook is an object with

    due(step, last) -> bool   asked after every step (host-only and cheap: no device sync)
    __call__(run, step)       when due
    end(run)                  once, after the last step (final save, final eval, a sample)

as Levanter's `trainer.add_hook(fn, every=N)` or big_vision's `if step % every == 0` blocks.
The loop's own hooks (metrics, eval, checkpoint, preemption) live in train/loop.py; a caller
adds its own with `train(..., hooks=[...])`: the CLI passes the end-of-run sample, so that
training never imports generation. Only metric hooks (at log steps), checkpoints and evals read
device values; between them dispatch stays asynchronous.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any


class Hook:
  every: int = 0

  def due(self, step: int, last: int) -> bool:
    """Every `every` steps, except the last (whose work `end` does)."""
    return bool(self.every) and step % self.every == 0 and step != last

  def __call__(self, run: "Run", step: int) -> None:
    pass

  def end(self, run: "Run") -> None:
    pass


class Timer:
  """Training time and tokens, without the compiling first step and the pauses (evals).

  `start` after the first step has finished; `add` each later step's tokens (a host count, no
  sync); `lap` at a step whose results have been fetched closes the interval up to it."""

  def __init__(self):
    self.t = None
    self.step = 0
    self.total_s, self.total_steps, self.total_tokens, self.pending = 0.0, 0, 0, 0

  def start(self, step: int) -> None:
    self.t, self.step = time.time(), step

  def add(self, tokens: int) -> None:
    self.pending += tokens

  def lap(self, step: int) -> tuple[float, float] | None:
    """(seconds a step, tokens a second) since the last lap, or None if no step was timed."""
    if self.t is None or step <= self.step:
      return None
    now = time.time()
    dt = (now - self.t) / (step - self.step)
    tps = self.pending / (now - self.t)
    self.total_s += now - self.t
    self.total_steps += step - self.step
    self.total_tokens, self.pending = self.total_tokens + self.pending, 0
    self.t, self.step = now, step
    return dt, tps

  @property
  def tokens_per_sec(self) -> float | None:
    return self.total_tokens / self.total_s if self.total_s else None


@dataclasses.dataclass
class Run:
  """One training run as the hooks see it."""
  comp: Any                 # loop.Components: config, mesh, model, objective, shardings
  data: Any                 # the objective's data (train/eval batches, tokenizer)
  workdir: str
  ckpt: Any                 # checkpoint.Checkpointer
  writer: Any               # metrics.MetricWriter
  state: Any                # TrainState (donated to each step: use only the latest)
  start: int                # the step the run began (or resumed) at
  last_step: int            # the step it will stop at (TrainConfig.stop_after or train_steps)
  resumed: bool = False
  step: int = 0
  metrics: Any = None       # the latest step's metrics, on device
  timer: Timer = dataclasses.field(default_factory=Timer)
  eval_record: dict = dataclasses.field(default_factory=dict)
  saved_step: int | None = None
  preempted: bool = False   # stopped early by a preemption signal, after a checkpoint
  summary: dict = dataclasses.field(default_factory=dict)
  identity: dict | None = None  # checkpoint.run_identity: what fixes the data order and shapes

  @property
  def exp(self):
    return self.comp.exp
