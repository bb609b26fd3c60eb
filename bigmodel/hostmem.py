"""Host allocator settings for bigmodel processes: keep freed memory for the next step.

XLA:CPU allocates a step's temporaries in one block (3.2 GiB for GPT-2 small at batch 4 x
256) and frees it when the step ends. glibc malloc serves a block that large with mmap from
any thread but the main one, and gives it back with munmap, so the next step page-faults and
zeroes all of it again: 520K page faults a step, and 19% of a GPT-2-small step on the 2-core
CPU. The small blocks of a nanoGPT step are trimmed off the top of the heap and faulted in
again the same way (12.6K faults, a third of its step). Accelerator hosts feed input and
checkpoints through the same allocator.

`keep_freed_memory()` sets, through mallopt: one arena (so large blocks come from the heap
rather than from a thread arena's mmap fallback), no mmap, no trimming, and a 64 MiB top pad.
A process then holds on to its high-water mark of host memory, as the allocators of the
frameworks do (XLA's BFC allocator, PyTorch's caching allocator) for device memory.

It is called first thing by `bigmodel` commands, and applies on CPU hosts only: on an
accelerator host the steps' temporaries live in device memory, and one arena that is never
trimmed could keep host memory that the input pipeline needs. A host counts as CPU-only when
JAX_PLATFORMS names cpu first, or (JAX_PLATFORMS unset) when it has no TPU or GPU device node
(/dev/accel*, /dev/vfio/<n>, /dev/nvidia<n>, /dev/kfd); this is read before jax loads, since
the settings must precede the first large allocation. BIGMODEL_MALLOC=keep applies them on any
host (opt-in), BIGMODEL_MALLOC=system never (e.g. when comparing); on a C library without
mallopt (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys

# <malloc.h>
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_MAX = -4
M_ARENA_MAX = -8

SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1), (M_TOP_PAD, 64 << 20))

ACCELERATOR_NODES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")

_applied: bool | None = None


def cpu_host() -> bool:
  """Whether this process will compute on CPU (decided before jax loads; see the docstring)."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(glob.glob(pattern) for pattern in ACCELERATOR_NODES)


def keep_freed_memory() -> bool:
  """Applies SETTINGS once per process on a CPU host (or with BIGMODEL_MALLOC=keep); True
  when glibc accepted all of them."""
  global _applied
  if _applied is not None:
    return _applied
  _applied = False
  choice = os.environ.get("BIGMODEL_MALLOC", "").lower()
  if choice == "system" or not sys.platform.startswith("linux") or (choice != "keep" and not cpu_host()):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.gnu_get_libc_version      # glibc only: other C libraries' mallopt differ or are stubs
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  _applied = all(mallopt(param, value) == 1 for param, value in SETTINGS)
  return _applied
