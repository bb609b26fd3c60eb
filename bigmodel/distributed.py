"""Multi-process start-up: `jax.distributed.initialize` when launched as several processes.

Explicit: BIGMODEL_COORDINATOR=host:port, BIGMODEL_NUM_PROCESSES, BIGMODEL_PROCESS_ID
(set by launch/local_multiprocess.sh). Otherwise SLURM (srun) and Cloud TPU pods are
detected by JAX itself: `jax.distributed.initialize()` with no arguments.
"""

from __future__ import annotations

import os

import jax

_initialized = False


def maybe_initialize() -> None:
  global _initialized
  if _initialized:
    return
  env = os.environ
  if "BIGMODEL_COORDINATOR" in env:
    # CPU devices of different processes talk through gloo (no effect on accelerators).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(env["BIGMODEL_COORDINATOR"],
                               num_processes=int(env["BIGMODEL_NUM_PROCESSES"]),
                               process_id=int(env["BIGMODEL_PROCESS_ID"]))
    _initialized = True
  elif int(env.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in env:
    jax.distributed.initialize()
    _initialized = True
