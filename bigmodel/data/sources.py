"""Text sources: local files (globs, relative to the data directory) and TFDS.

Local files are read as UTF-8 (a BOM is dropped, CRLF becomes LF) and split into
documents by `DataConfig.documents`:
  file        each file is one document
  blank_line  documents are separated by blank lines
  line        each non-empty line is a document
  heading     WikiText: a ` = Title = ` line starts a new article
"""

from __future__ import annotations

import logging
import os
import re
from typing import Sequence

from bigmodel import storage
from bigmodel.config import DataConfig

log = logging.getLogger(__name__)


class DataError(ValueError):
  """Missing, empty or malformed input data: the message says which and how to fix it."""


def _expand(pattern: str, data_dir: str) -> list[str]:
  explicit = os.path.isabs(pattern) or storage.is_remote(pattern) or not data_dir
  path = pattern if explicit else storage.join(data_dir, pattern)
  path = path if storage.is_remote(path) else os.path.expanduser(path)
  if any(ch in path for ch in "*?["):
    return storage.glob(path)
  return [path] if storage.exists(path) else []


def resolve_files(patterns: Sequence[str], data_dir: str, what: str = "DataConfig.files",
                  allow_fallback: bool = False) -> list[str] | None:
  """Paths for `patterns`; None when missing and a TFDS fallback is allowed.

  A relative pattern from a recipe may fall back to TFDS when the data directory lacks
  it; a file named explicitly (absolute path) that does not exist is always an error.
  """
  paths, missing = [], []
  for pattern in patterns:
    found = _expand(pattern, data_dir)
    (paths.extend(found) if found else missing.append(pattern))
  if not missing:
    return paths
  explicit = [p for p in missing if os.path.isabs(os.path.expanduser(p)) or storage.is_remote(p)]
  if allow_fallback and not explicit:
    log.warning("%s %s not found under data_dir=%r; falling back to TFDS", what, missing, data_dir)
    return None
  where = f" under data_dir={data_dir!r}" if data_dir and not explicit else ""
  raise DataError(
      f"{what}: no file matches {missing}{where}. Check the path, or set the data directory "
      f"with --gin.DATA_DIR=... or $BIGMODEL_DATA_DIR.")


def read_text(path: str) -> str:
  return storage.read_text(path, encoding="utf-8-sig", newline=None)   # newline=None: CRLF -> LF


_HEADING = re.compile(r"^ = [^=].* = $", re.M)


def split_documents(text: str, mode: str) -> list[str]:
  if mode == "file":
    return [text] if text.strip() else []
  if mode == "blank_line":
    docs = re.split(r"\n\s*\n", text)
  elif mode == "line":
    docs = text.split("\n")
  elif mode == "heading":
    starts = [m.start() for m in _HEADING.finditer(text)]
    if not starts or starts[0] != 0:
      starts = [0] + starts
    docs = [text[a:b] for a, b in zip(starts, starts[1:] + [len(text)])]
  else:
    raise DataError(f"DataConfig.documents={mode!r}: expected file, blank_line, line or heading")
  return [d for d in (doc.strip("\n") for doc in docs) if d.strip()]


def read_documents(paths: Sequence[str], mode: str) -> list[str]:
  docs = []
  for path in paths:
    docs.extend(split_documents(read_text(path), mode))
  return docs


def tfds_examples(name: str, split: str, data_dir: str | None = None,
                  instead: str = "put the files under the data directory instead"):
  """The numpy examples of a TFDS split; a DataError (ending "With no network, {instead}.")
  when the dataset cannot be had."""
  from bigmodel.data import tf  # noqa: F401 - first, so that the accelerators are hidden
  import tensorflow_datasets as tfds
  try:
    ds = tfds.load(name, split=split, data_dir=data_dir or None, download=True)
  except Exception as e:  # tfds raises many kinds; all mean "cannot get this dataset"
    raise DataError(f"could not load TFDS dataset {name!r} split {split!r}: {e}. With no "
                    f"network, {instead}.") from None
  return tfds.as_numpy(ds)


def tfds_documents(name: str, split: str, text_key: str, data_dir: str | None = None) -> list[str]:
  """Every example's `text_key` field of a TFDS split, as one document each."""
  docs = []
  for example in tfds_examples(name, split, data_dir):
    if text_key not in example:
      raise DataError(f"TFDS {name!r} has no field {text_key!r}; fields: {sorted(example)}")
    docs.append(example[text_key].decode("utf-8"))
  return docs


def lm_documents(cfg: DataConfig) -> tuple[list[str], list[str] | None, str]:
  """(train documents, validation documents or None, a description of the source)."""
  paths = None
  if cfg.files:
    paths = resolve_files(cfg.files, cfg.data_dir, allow_fallback=bool(cfg.tfds_name))
  if paths is not None:
    train = read_documents(paths, cfg.documents)
    val = None
    if cfg.val_files:
      val_paths = resolve_files(cfg.val_files, cfg.data_dir, "DataConfig.val_files")
      val = read_documents(val_paths, cfg.documents)
    return _scrubbed(cfg, train), _scrubbed(cfg, val), f"files {paths}"
  if not cfg.tfds_name:
    raise DataError("no data: set DataConfig.files (local text files) or DataConfig.tfds_name")
  train = tfds_documents(cfg.tfds_name, "train", cfg.tfds_text_key)
  val = tfds_documents(cfg.tfds_name, "validation", cfg.tfds_text_key)
  return _scrubbed(cfg, train), _scrubbed(cfg, val), f"TFDS {cfg.tfds_name}"


def _scrubbed(cfg: DataConfig, docs: list[str] | None) -> list[str] | None:
  """The documents with PII replaced by placeholders when DataConfig.scrub_pii is on."""
  if not cfg.scrub_pii or docs is None:
    return docs
  from bigmodel.data import pii
  out = pii.scrub_all(docs)
  pii.report("documents")
  return out
