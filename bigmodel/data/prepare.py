"""`bigmodel data prepare`: a text corpus -> shards of packed token rows plus an index.

The corpus (`DataConfig.files`) is cut into chunks at document boundaries (whole files, or
~`chunk_mb` pieces of large files), and a pool of processes tokenizes the chunks in
parallel. Each chunk packs its documents into rows exactly as the in-memory pipeline
(`bigmodel.data.lm`) packs one stream: a row is `seq_len + 1` tokens starting every
`window_stride` tokens, EOS after each document. Chunk i writes `train-i.bin` (and
`val-i.bin`: the last `val_fraction` of the chunk's tokens, or the chunks of
`DataConfig.val_files`). Rows that would span two chunks are not made: each chunk drops
its last partial row (fewer than `window_stride` + 1 tokens a chunk).

Shard files are fixed-width binary: row r of a shard starts at byte r * row_bytes and
holds `seq_len + 1` token ids (`token_dtype`: uint16 when the vocabulary fits, else int32,
little-endian), then ceil((seq_len + 1) / 8) bytes of `np.packbits` flags, bit t set
when token t is the first of its document. Segment ids, positions and loss weights
follow from the flags (`bigmodel.data.shards.decode_rows`). `index.json`, written last,
lists the shards and their row counts; a directory without it is an unfinished prepare.

This module needs no TensorFlow (its worker processes start fast); the reader is
`bigmodel.data.shards`. Paths with a scheme (gs://, s3://, memory://) go through fsspec.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from typing import Sequence

import numpy as np

from bigmodel.config import DataConfig
from bigmodel.data import sources, tokenizers
from bigmodel.data.sources import DataError

log = logging.getLogger(__name__)

FORMAT = "bigmodel-lm-rows"
VERSION = 1
INDEX = "index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.txt", "vocab.json", "merges.txt",
                   "tokenizer_config.json", "special_tokens_map.json")


# ---------------------------------------------------------------------------------------
# Paths: local or fsspec URLs (the project's storage layer may replace these helpers).

def has_scheme(path: str) -> bool:
  return "://" in path


def join(base: str, name: str) -> str:
  return base.rstrip("/") + "/" + name if has_scheme(base) else os.path.join(base, name)


def open_file(path: str, mode: str = "rb"):
  if has_scheme(path):
    import fsspec
    return fsspec.open(path, mode).open()
  return open(path, mode)


def exists(path: str) -> bool:
  if has_scheme(path):
    import fsspec
    fs, p = fsspec.core.url_to_fs(path)
    return fs.exists(p)
  return os.path.exists(path)


def makedirs(path: str) -> None:
  if has_scheme(path):
    import fsspec
    fs, p = fsspec.core.url_to_fs(path)
    fs.makedirs(p, exist_ok=True)
  else:
    os.makedirs(path, exist_ok=True)


# ---------------------------------------------------------------------------------------
# Row format.

@dataclasses.dataclass(frozen=True)
class RowFormat:
  seq_len: int
  token_dtype: str           # uint16 | int32

  @property
  def width(self) -> int:
    return self.seq_len + 1

  @property
  def token_bytes(self) -> int:
    return self.width * np.dtype(self.token_dtype).itemsize

  @property
  def row_bytes(self) -> int:
    return self.token_bytes + (self.width + 7) // 8

  def encode(self, tokens: np.ndarray, starts_doc: np.ndarray) -> np.ndarray:
    """tokens [n, width] ints, starts_doc [n, width] bool -> [n, row_bytes] uint8."""
    tok = np.ascontiguousarray(tokens, dtype=np.dtype(self.token_dtype).newbyteorder("<"))
    flags = np.packbits(starts_doc.astype(bool), axis=1)
    return np.concatenate([tok.view(np.uint8).reshape(len(tok), -1), flags], axis=1)


def token_dtype_for(vocab_size: int) -> str:
  return "uint16" if vocab_size <= 65536 else "int32"


def pack_rows(tokens: np.ndarray, starts_doc: np.ndarray, fmt: RowFormat, stride: int) -> np.ndarray:
  """A token stream (and its document-start flags) -> encoded rows, as data/lm.py windows it:
  row r is tokens [r * stride, r * stride + seq_len + 1)."""
  n_rows = max(0, (len(tokens) - fmt.width) // stride + 1)
  if n_rows == 0:
    return np.zeros((0, fmt.row_bytes), np.uint8)
  windows = np.lib.stride_tricks.sliding_window_view
  tok = windows(tokens, fmt.width)[::stride][:n_rows]
  flags = windows(starts_doc, fmt.width)[::stride][:n_rows]
  return fmt.encode(tok, flags)


# ---------------------------------------------------------------------------------------
# Chunks of the corpus, cut at document boundaries.

_BOUNDARY = {
    "line": re.compile(rb"\n"),
    "blank_line": re.compile(rb"\n[ \t\r\f\v]*\n"),
    "heading": re.compile(rb"\n(?= = [^=\r\n][^\r\n]* = \r?\n)"),
}


@dataclasses.dataclass(frozen=True)
class Chunk:
  path: str
  start: int
  end: int            # byte range [start, end)
  split: str          # train | val: which shard set it writes (val_fraction: both)


def _next_boundary(f, pos: int, size: int, pattern, block: int = 1 << 20) -> int:
  """The first byte after a document boundary at or after pos (size: none found)."""
  while pos < size:
    f.seek(pos)
    data = f.read(block + 64)
    m = pattern.search(data)
    if m and m.end() <= len(data):
      return pos + m.end()
    pos += block
  return size


def plan_chunks(paths: Sequence[str], mode: str, split: str, chunk_bytes: int) -> list[Chunk]:
  chunks = []
  for path in paths:
    size = os.path.getsize(path)
    pattern = _BOUNDARY.get(mode)
    if pattern is None or size <= chunk_bytes:   # `file` documents are never cut
      chunks.append(Chunk(path, 0, size, split))
      continue
    with open(path, "rb") as f:
      start = 0
      while start < size:
        end = _next_boundary(f, start + chunk_bytes, size, pattern) if start + chunk_bytes < size else size
        chunks.append(Chunk(path, start, end, split))
        start = end
  return chunks


def chunk_documents(chunk: Chunk, mode: str) -> list[str]:
  with open(chunk.path, "rb") as f:
    f.seek(chunk.start)
    data = f.read(chunk.end - chunk.start)
  text = data.decode("utf-8-sig" if chunk.start == 0 else "utf-8")
  return sources.split_documents(text.replace("\r\n", "\n").replace("\r", "\n"), mode)


# ---------------------------------------------------------------------------------------
# Workers.

@dataclasses.dataclass(frozen=True)
class Job:
  chunk: Chunk
  number: int          # shard number of its outputs
  out: str
  tokenizer_dir: str   # local directory holding the saved tokenizer
  mode: str
  add_eos: bool
  fmt: RowFormat
  stride: int
  val_fraction: float  # >0: the chunk's last tokens go to val


def stream(docs: list[str], tokenizer, add_eos: bool) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 [n], starts_doc bool [n]) of documents back to back."""
  eos = tokenizer.eos_id if add_eos else None
  pieces = []
  for doc in docs:
    ids = tokenizers.encode_ordinary(tokenizer, doc)   # raw text: no control tokens
    pieces.append(np.append(ids, np.int32(eos)) if eos is not None else ids)
  pieces = [p for p in pieces if len(p)]
  if not pieces:
    return np.zeros(0, np.int32), np.zeros(0, bool)
  starts = np.zeros(sum(map(len, pieces)), bool)
  starts[np.cumsum([0] + [len(p) for p in pieces[:-1]])] = True
  return np.concatenate(pieces), starts


_WORKER_TOKENIZER: dict = {}


def _tokenizer(directory: str):
  if directory not in _WORKER_TOKENIZER:
    _WORKER_TOKENIZER[directory] = tokenizers.load(directory)
  return _WORKER_TOKENIZER[directory]


def write_shard(path: str, rows: np.ndarray) -> None:
  with open_file(path, "wb") as f:
    f.write(rows.tobytes())


def run_job(job: Job) -> dict:
  """Tokenizes and packs one chunk; writes its shard(s). Returns {split: (file, rows, tokens)}."""
  tok = _tokenizer(job.tokenizer_dir)
  tokens, starts = stream(chunk_documents(job.chunk, job.mode), tok, job.add_eos)
  parts = {job.chunk.split: (tokens, starts)}
  if job.val_fraction > 0:       # as lm.TokenStream.split: the tail's first token starts a document
    cut = int(round(len(tokens) * (1 - job.val_fraction)))
    val_starts = starts[cut:].copy()
    val_starts[:1] = True
    parts = {"train": (tokens[:cut], starts[:cut]), "val": (tokens[cut:], val_starts)}
  out = {}
  for split, (t, s) in parts.items():
    stride = job.stride if split == "train" else job.fmt.seq_len
    rows = pack_rows(t, s, job.fmt, stride)
    name = f"{split}-{job.number:05d}.bin"
    if len(rows):
      write_shard(join(job.out, name), rows)
    out[split] = (name, len(rows), int(len(t)))
  return out


# ---------------------------------------------------------------------------------------
# The driver.

def _input_paths(cfg: DataConfig) -> tuple[list[str], list[str]]:
  if not cfg.files:
    raise DataError("`bigmodel data prepare` reads local text files: set DataConfig.files "
                    "(TFDS sources are read in memory by `bigmodel train`)")
  train = sources.resolve_files(cfg.files, cfg.data_dir)
  val = sources.resolve_files(cfg.val_files, cfg.data_dir, "DataConfig.val_files") if cfg.val_files else []
  return train, val


def _build_tokenizer(cfg: DataConfig, paths: list[str]):
  texts = sources.read_documents(paths, cfg.documents) if cfg.tokenizer == "char" else None
  try:
    return tokenizers.build(cfg.tokenizer, texts)
  except (ValueError, OSError) as e:
    raise DataError(f"DataConfig.tokenizer={cfg.tokenizer!r}: {e}") from None


def _run_jobs(jobs: list[Job], workers: int) -> list[dict]:
  if workers <= 1 or len(jobs) <= 1:
    return [run_job(j) for j in jobs]
  # fork where there is one: a worker runs only numpy and the tokenizer, never TF or JAX, so the
  # threads those libraries may hold in the parent are never needed in it; a spawned worker
  # would import TensorFlow again (the bigmodel.data package does), seconds per worker.
  methods = multiprocessing.get_all_start_methods()
  ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
  with ctx.Pool(min(workers, len(jobs))) as pool:
    return list(pool.imap(run_job, jobs, chunksize=1))


def _split_index(results: list[dict], split: str) -> dict:
  shards = [{"file": r[split][0], "rows": r[split][1], "tokens": r[split][2]}
            for r in results if split in r and r[split][1] > 0]
  return {"shards": shards, "rows": sum(s["rows"] for s in shards),
          "tokens": sum(r[split][2] for r in results if split in r)}


def write_index(out: str, index: dict) -> None:
  with open_file(join(out, INDEX), "w") as f:
    json.dump(index, f, indent=1)


def copy_tokenizer(tokenizer, out: str) -> None:
  with tempfile.TemporaryDirectory() as tmp:
    tokenizer.save(tmp)
    for name in os.listdir(tmp):
      with open(os.path.join(tmp, name), "rb") as src, open_file(join(out, name), "wb") as dst:
        shutil.copyfileobj(src, dst)


def base_index(cfg: DataConfig, tokenizer, fmt: RowFormat, stride: int) -> dict:
  return {"format": FORMAT, "version": VERSION, "seq_len": fmt.seq_len, "window_stride": stride,
          "token_dtype": fmt.token_dtype, "row_bytes": fmt.row_bytes,
          "vocab_size": int(tokenizer.vocab_size), "eos_id": tokenizer.eos_id,
          "add_eos": cfg.add_eos, "documents": cfg.documents, "tokenizer": cfg.tokenizer}


def prepare(cfg: DataConfig, out: str, workers: int = 0, chunk_mb: float = 64.0) -> dict:
  """Tokenizes `cfg.files` (and `cfg.val_files`) into shards under `out`; returns a summary."""
  t0 = time.perf_counter()
  if exists(join(out, INDEX)):
    raise DataError(f"--out {out} already holds a prepared corpus ({INDEX}); choose another "
                    f"directory or delete it first")
  train_paths, val_paths = _input_paths(cfg)
  tokenizer = _build_tokenizer(cfg, train_paths)
  fmt = RowFormat(cfg.seq_len, token_dtype_for(tokenizer.vocab_size))
  stride = cfg.window_stride or cfg.seq_len
  chunk_bytes = max(1, int(chunk_mb * 2**20))
  chunks = plan_chunks(train_paths, cfg.documents, "train", chunk_bytes)
  chunks += plan_chunks(val_paths, cfg.documents, "val", chunk_bytes)
  makedirs(out)
  workers = workers or os.cpu_count() or 1
  with tempfile.TemporaryDirectory() as tok_dir:
    tokenizer.save(tok_dir)
    jobs = [Job(c, i, out, tok_dir, cfg.documents, cfg.add_eos, fmt, stride,
                0.0 if val_paths else cfg.val_fraction) for i, c in enumerate(chunks)]
    results = _run_jobs(jobs, workers)
  copy_tokenizer(tokenizer, out)
  index = base_index(cfg, tokenizer, fmt, stride)
  index["sources"] = {"files": train_paths, "val_files": val_paths}
  index["splits"] = {s: _split_index(results, s) for s in ("train", "val")}
  if index["splits"]["train"]["rows"] == 0:
    raise DataError(f"{train_paths}: no chunk holds one row of seq_len + 1 = {fmt.width} tokens; "
                    f"add data or lower SEQ_LEN")
  write_index(out, index)    # last: its presence marks a finished prepare
  seconds = time.perf_counter() - t0
  tokens = index["splits"]["train"]["tokens"] + index["splits"]["val"]["tokens"]
  return {"out": out, "chunks": len(chunks), "workers": min(workers, len(chunks)),
          "train_rows": index["splits"]["train"]["rows"], "val_rows": index["splits"]["val"]["rows"],
          "tokens": tokens, "seconds": seconds, "tokens_per_sec": tokens / max(seconds, 1e-9),
          "token_dtype": fmt.token_dtype}


def write_token_shards(out: str, split: str, shards, fmt: RowFormat, stride: int) -> dict:
  """Writes (tokens, starts_doc) streams as shards `split-i.bin`; returns the split's index.
  (`bigmodel.data.shards` benchmarks use it to write large generated corpora quickly.)"""
  makedirs(out)
  results = []
  for i, (tokens, starts) in enumerate(shards):
    rows = pack_rows(tokens, starts, fmt, stride)
    name = f"{split}-{i:05d}.bin"
    if len(rows):
      write_shard(join(out, name), rows)
    results.append({split: (name, len(rows), int(len(tokens)))})
  return _split_index(results, split)
