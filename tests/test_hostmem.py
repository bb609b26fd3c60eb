"""The host allocator settings: freed memory is reused without page faults."""

import os
import subprocess
import sys

from bigmodel import hostmem

# Mallocs, writes and frees a 256 MiB block twice from a second thread (as XLA's worker
# threads do) and prints the page faults of the second round: glibc's defaults mmap and munmap
# a block that large, so it faults again (65K pages of 4 KiB); with bigmodel's settings the
# second round reuses the heap.
PROBE = """
import resource, sys
from bigmodel import hostmem
print(hostmem.keep_freed_memory())
import ctypes
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def touch():
  p = libc.malloc(256 << 20)
  ctypes.memset(p, 1, 256 << 20)
  libc.free(p)
import threading
def in_thread(f):
  t = threading.Thread(target=f)
  t.start()
  t.join()
in_thread(touch)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
in_thread(touch)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(**env):
  out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True,
                       env={**os.environ, **env}, cwd=os.path.dirname(os.path.dirname(__file__)))
  applied, faults = out.stdout.split()
  return applied == "True", int(faults)


def test_freed_memory_is_reused_without_page_faults():
  applied, faults = _probe(BIGMODEL_MALLOC="")
  assert applied
  assert faults < 1000, faults              # 256 MiB is 65,536 pages
  applied, faults = _probe(BIGMODEL_MALLOC="system")
  assert not applied
  assert faults > 30000, faults


def test_settings_stay_on_cpu_hosts(monkeypatch):
  """An accelerator host keeps glibc's defaults unless BIGMODEL_MALLOC=keep opts in."""
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  assert not hostmem.cpu_host()
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  assert hostmem.cpu_host()
  monkeypatch.delenv("JAX_PLATFORMS")
  monkeypatch.setattr(hostmem.glob, "glob", lambda p: ["/dev/accel0"] if "accel" in p else [])
  assert not hostmem.cpu_host()
  applied, _ = _probe(JAX_PLATFORMS="tpu", BIGMODEL_MALLOC="")
  assert not applied
  applied, faults = _probe(JAX_PLATFORMS="tpu", BIGMODEL_MALLOC="keep")
  assert applied and faults < 1000
