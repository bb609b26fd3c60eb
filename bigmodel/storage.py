"""One path layer for every file the project reads or writes.

A path is either local (`/runs/x`, `runs/x`) or an object-store URL (`gs://bucket/run`,
`s3://...` where the fsspec backend is installed: gcsfs for gs://, s3fs for s3://).
Local paths go through `os`/`open` as before; URLs go through fsspec, and orbax's
own directory operations (etils.epath) are sent through fsspec too, so one library
talks to the store whatever process or thread writes.

`configure()` reads the environment once per process and sets what the libraries
need (it says so in the log). It is called by every function here and by the CLI
before any command runs:
  - `EPATH_USE_TF=0` (unless set): etils.epath would route gs:// through
    tf.io.gfile when TensorFlow is installed; with it off, orbax's metadata and
    directory operations use gcsfs, the same client as the rest of the project.
  - With `STORAGE_EMULATOR_HOST` (a GCS API server such as gcp-storage-emulator):
    tensorstore (orbax's array store) gets `TENSORSTORE_GCS_HTTP_URL`, gcsfs gets
    anonymous credentials, and the gRPC-only bucket-type probe of newer gcsfs
    (`GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT`) is off: an emulator speaks only JSON/HTTP.

Object stores have no append and no directories: `makedirs` is a no-op there, and
`AppendFile` (metrics.jsonl, TensorBoard events) keeps the object's content and
rewrites it at most every `flush_secs` and on close.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import json
import logging
import os
import sys
import posixpath
import shutil
import threading
import time
from typing import IO, Any, Iterator

log = logging.getLogger(__name__)

_configured_for: str | None = None    # the STORAGE_EMULATOR_HOST configure() last applied
_lock = threading.Lock()


def is_remote(path) -> bool:
  """True for a URL with a scheme other than file:// (gs://, s3://, memory://, ...)."""
  path = os.fspath(path)
  return "://" in path and not path.startswith("file://")


def _local(path) -> str:
  path = os.fspath(path)
  return path[len("file://"):] if path.startswith("file://") else path


def configure() -> None:
  """Sets the environment the storage libraries read (module docstring); again only when
  STORAGE_EMULATOR_HOST has changed since the last call (a test may start an emulator)."""
  global _configured_for
  emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
  if _configured_for == emulator:
    return
  with _lock:
    os.environ.setdefault("EPATH_USE_TF", "0")
    gpath = sys.modules.get("etils.epath.gpath")     # etils caches its first answer to "use
    if gpath is not None and hasattr(gpath, "_is_tf_installed"):   # tf.io.gfile?": ask again
      gpath._is_tf_installed.cache_clear()   # pylint: disable=protected-access
    if emulator:
      url = emulator if emulator.startswith(("http://", "https://")) else f"http://{emulator}"
      os.environ["TENSORSTORE_GCS_HTTP_URL"] = url
      os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"
      import fsspec
      import gcsfs.core
      # Registered explicitly: gcsfs may have been imported before the variable above was set.
      for proto in ("gs", "gcs"):
        fsspec.register_implementation(proto, gcsfs.core.GCSFileSystem, clobber=True)
      gcsfs.core.GCSFileSystem.clear_instance_cache()    # instances keep the endpoint they began with
      fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
      log.info("object storage: GCS emulator at %s (tensorstore, gcsfs, orbax)", url)
    _configured_for = emulator


def filesystem(path):
  """(fsspec filesystem, path inside it) of a URL."""
  configure()
  import fsspec
  path = os.fspath(path)
  proto = path.split("://", 1)[0]
  return fsspec.filesystem("gcs" if proto == "gs" else proto), path


def join(base, *parts) -> str:
  base = os.fspath(base)
  if is_remote(base):
    return posixpath.join(base, *parts)
  return os.path.join(base, *parts)


def absolute(path) -> str:
  """An absolute local path, or the URL unchanged (no trailing slash)."""
  path = os.fspath(path)
  if is_remote(path):
    return path.rstrip("/")
  return os.path.abspath(os.path.expanduser(_local(path)))


def dirname(path) -> str:
  path = os.fspath(path).rstrip("/")
  return posixpath.dirname(path) if is_remote(path) else os.path.dirname(path)


def basename(path) -> str:
  path = os.fspath(path).rstrip("/")
  return posixpath.basename(path) if is_remote(path) else os.path.basename(path)


def exists(path) -> bool:
  if not is_remote(path):
    return os.path.exists(_local(path))
  fs, p = filesystem(path)
  return fs.exists(p)


def isdir(path) -> bool:
  if not is_remote(path):
    return os.path.isdir(_local(path))
  fs, p = filesystem(path)
  return fs.isdir(p)


def isfile(path) -> bool:
  if not is_remote(path):
    return os.path.isfile(_local(path))
  fs, p = filesystem(path)
  return fs.isfile(p)


def listdir(path) -> list[str]:
  """Names (not paths) in a directory, sorted; [] for a missing one."""
  if not is_remote(path):
    p = _local(path)
    return sorted(os.listdir(p)) if os.path.isdir(p) else []
  fs, p = filesystem(path)
  try:
    return sorted(posixpath.basename(e.rstrip("/")) for e in fs.ls(p, detail=False))
  except FileNotFoundError:
    return []


def glob(pattern) -> list[str]:
  """Sorted matches; URLs come back as URLs."""
  pattern = os.fspath(pattern)
  if not is_remote(pattern):
    import glob as glob_lib
    return sorted(glob_lib.glob(_local(pattern)))
  fs, p = filesystem(pattern)
  scheme = pattern.split("://", 1)[0]
  return sorted(f"{scheme}://{m}" for m in fs.glob(p))


def makedirs(path) -> None:
  """A local directory (and its parents); nothing on an object store (no directories)."""
  if not is_remote(path):
    os.makedirs(_local(path), exist_ok=True)


def remove(path) -> None:
  if not is_remote(path):
    os.remove(_local(path))
    return
  fs, p = filesystem(path)
  fs.rm(p)


def rmtree(path) -> None:
  if not is_remote(path):
    shutil.rmtree(_local(path))
    return
  fs, p = filesystem(path)
  fs.rm(p, recursive=True)


def open(path, mode: str = "r", **kwargs) -> IO:  # noqa: A001 - the one `open` of the project
  """A file object. Writing a local file makes its directory; `newline`/`encoding` as in open()."""
  if not is_remote(path):
    p = _local(path)
    if any(m in mode for m in "wax"):
      d = os.path.dirname(os.path.abspath(p))
      os.makedirs(d, exist_ok=True)
    return builtins.open(p, mode, **kwargs)
  if "a" in mode:
    raise ValueError(f"{path}: object stores cannot append; use storage.AppendFile")
  fs, p = filesystem(path)
  if "b" in mode:
    return fs.open(p, mode)
  binary = fs.open(p, mode.replace("t", "") + "b")
  return io.TextIOWrapper(binary, encoding=kwargs.get("encoding") or "utf-8",
                          newline=kwargs.get("newline"))


def read_bytes(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def read_text(path, encoding: str = "utf-8", newline: str | None = None) -> str:
  with open(path, "r", encoding=encoding, newline=newline) as f:
    return f.read()


def write_bytes(path, data: bytes) -> None:
  with open(path, "wb") as f:
    f.write(data)


def write_text(path, text: str) -> None:
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)


def read_json(path) -> Any:
  return json.loads(read_text(path))


def write_json(path, obj, indent: int | None = 1) -> None:
  write_text(path, json.dumps(obj, indent=indent))


def move(src, dst) -> None:
  """Moves a file or a directory tree (on an object store: copy, then delete)."""
  if not is_remote(src) and not is_remote(dst):
    makedirs(dirname(absolute(dst)))
    shutil.move(_local(src), _local(dst))
    return
  fs, s = filesystem(src)
  _, d = filesystem(dst)
  # copy + delete rather than fs.mv: gcsfs's mv first tries the moveTo API (hierarchical
  # buckets only) and retries it with backoff wherever it is not served.
  fs.copy(s, d, recursive=True)
  fs.rm(s, recursive=True)


def copy(src, dst) -> None:
  if os.fspath(src) == os.fspath(dst):
    return
  if not is_remote(src) and not is_remote(dst):
    makedirs(dirname(absolute(dst)))
    shutil.copyfile(_local(src), _local(dst))
    return
  write_bytes(dst, read_bytes(src))


@contextlib.contextmanager
def local_file(path) -> Iterator[str]:
  """A local filename holding `path`'s bytes, for libraries that take only a filename
  (safetensors' mmap, a pickle loader). A URL is copied to a temporary file, removed on exit."""
  if not is_remote(path):
    yield _local(path)
    return
  import tempfile
  suffix = os.path.splitext(os.fspath(path))[1]
  with tempfile.NamedTemporaryFile(suffix=suffix) as tmp:
    fs, p = filesystem(path)
    fs.get_file(p, tmp.name)
    yield tmp.name


def epath(path):
  """An etils.epath.Path (what orbax takes), after `configure()`."""
  configure()
  from etils import epath as epath_lib
  return epath_lib.Path(absolute(path))


class AppendFile:
  """A file that grows: `write(data)`, `flush()`, `close()`.

  Local: an ordinary append-mode file, flushed on every flush(). Object store: the
  object's existing bytes are read once, new bytes are kept, and the whole object is
  rewritten on flush() at most every `flush_secs` (and always on close), since an
  object cannot be appended to.
  """

  def __init__(self, path, binary: bool = False, flush_secs: float = 10.0):
    self.path, self.binary, self.flush_secs = os.fspath(path), binary, flush_secs
    self._remote = is_remote(self.path)
    if self._remote:
      self._data = bytearray(read_bytes(self.path) if exists(self.path) else b"")
      self._dirty, self._last = False, 0.0
    else:
      self._file = open(self.path, "ab" if binary else "a")

  def write(self, data) -> None:
    if not self._remote:
      self._file.write(data)
      return
    self._data += data if self.binary else data.encode("utf-8")
    self._dirty = True

  def flush(self, force: bool = False) -> None:
    if not self._remote:
      self._file.flush()
      return
    if self._dirty and (force or time.time() - self._last >= self.flush_secs):
      write_bytes(self.path, bytes(self._data))
      self._dirty, self._last = False, time.time()

  def close(self) -> None:
    if self._remote:
      self.flush(force=True)
    else:
      self._file.close()
