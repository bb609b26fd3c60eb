"""Preemption: SIGTERM or SIGUSR1 -> every process saves a checkpoint at the same next step
and the command exits with EXIT_PREEMPTED, which a requeue tells from a failure.

Several processes agree on the step through JAX's preemption sync service (the one orbax's
`CheckpointManager.reached_preemption` uses): the process that receives SIGTERM tells the
coordination service, which picks the step after the furthest any process has reported, and
`multihost_utils.reached_preemption_sync_point(step)` turns true at that step on every
process. The check is a host call each step, with no device sync and no collective. That
service listens for SIGTERM only, so SIGUSR1 (what SLURM's `--signal` sends before the time
limit) is turned into a SIGTERM to this process. A single process (no jax.distributed) just
sets a flag in a Python handler and stops after the step it is running.

The handlers are installed for the duration of `train()` only (the `with` block) and the
previous ones restored after it; the SIGTERM handler of the JAX service, in C++, stays for the
rest of a multi-process run's life (it is the service's).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import jax

log = logging.getLogger(__name__)

# sysexits.h EX_TEMPFAIL: "a temporary failure; the user is invited to retry". Not 0 (the run
# is unfinished), not 1 (a failure), not 2 (bad usage), not 128+N (killed by signal N).
EXIT_PREEMPTED = 75
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def _sync_service():
  """JAX's preemption sync manager when this is a multi-process run that has one."""
  if jax.process_count() == 1:
    return None
  from jax._src import distributed
  return getattr(distributed.global_state, "preemption_sync_manager", None)


class Preemption:
  """`with Preemption() as p:` ... `p.reached(step)` after every step of every process."""

  def __init__(self):
    self.signal: int | None = None
    self._previous: dict[int, object] = {}
    self._service = None

  def __enter__(self) -> "Preemption":
    self._service = _sync_service()
    if jax.process_count() > 1 and self._service is None:
      log.warning("no JAX preemption sync service in this multi-process run "
                  "(jax_enable_preemption_service off?): SIGTERM will not save a checkpoint")
    if threading.current_thread() is not threading.main_thread():
      return self            # signal handlers can only be set from the main thread
    mine = (signal.SIGUSR1,) if self._service is not None else SIGNALS
    for sig in mine:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    self.signal = signum
    if self._service is not None:
      os.kill(os.getpid(), signal.SIGTERM)   # the JAX service's own notifier takes it from here

  def reached(self, step: int) -> bool:
    """True at the step every process saves and stops at (the same step on each)."""
    if self._service is not None:
      from jax.experimental import multihost_utils
      return multihost_utils.reached_preemption_sync_point(step)
    return self.signal is not None
