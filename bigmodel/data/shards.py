"""Streaming LM input from a prepared directory (`bigmodel data prepare`, data/prepare.py).

Same contract as the in-memory pipeline (data/lm.py): the batch at step i is global
examples [i*B, (i+1)*B), example k is row `index_shuffle(k mod n, seed, epoch k // n)` of
the training shards, reshuffled every epoch, so resuming at a step is exact. The shuffle
is TF's stateless index permutation over int64 row ids: nothing of size n is ever built.
Each host computes only its slice (host_rows) of each batch and reads just those rows: a
row is one fixed-width range of one shard (positioned read on local disk, a ranged GET
through fsspec on object storage). Memory is the index (one entry per shard) plus the
batches in flight, whatever the corpus size.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import tempfile
import threading

import numpy as np
from bigmodel.data import lazy_tf as tf  # imported at first use: see bigmodel/data/__init__.py

from bigmodel.config import DataConfig
from bigmodel.data import lm, prepare, tokenizers
from bigmodel.data.sources import DataError

log = logging.getLogger(__name__)

FIELDS = ("inputs", "targets", "positions", "segment_ids", "weights")


def decode_rows(raw: np.ndarray, fmt: prepare.RowFormat) -> dict:
  """Encoded rows [n, row_bytes] uint8 -> the fields of data/lm.py's rows ([n, seq_len] each).

  Positions restart at each document and at the row start; segment ids number the row's
  documents from 1 (data/lm.py numbers them by stream offset: the same partition); a
  target in another document than its input weighs 0."""
  n, width = len(raw), fmt.width
  tok = raw[:, :fmt.token_bytes].copy().view(np.dtype(fmt.token_dtype).newbyteorder("<"))
  tok = tok.reshape(n, width).astype(np.int32)
  starts = np.unpackbits(raw[:, fmt.token_bytes:], axis=1, count=width).astype(bool)
  t = np.arange(width - 1, dtype=np.int32)
  last_start = np.maximum.accumulate(np.where(starts[:, :-1], t, 0), axis=1)
  segments = np.cumsum(starts[:, :-1], axis=1, dtype=np.int32)
  return {"inputs": tok[:, :-1], "targets": tok[:, 1:], "positions": t - last_start,
          "segment_ids": segments - segments[:, :1] + 1,
          "weights": (~starts[:, 1:]).astype(np.float32)}


def locate(offsets: np.ndarray, rows: np.ndarray, row_bytes: int) -> tuple[np.ndarray, np.ndarray]:
  """Global row ids (int64) -> (shard number, byte offset in the shard), all int64.
  offsets: the first global row of each shard, ascending (offsets[0] == 0)."""
  rows = np.asarray(rows, np.int64)
  shard = np.searchsorted(offsets, rows, side="right") - 1
  return shard, (rows - offsets[shard]) * np.int64(row_bytes)


class ShardReader:
  """Reads rows of one split by global row id; opens a shard only when a row needs it."""

  def __init__(self, directory: str, split: dict, fmt: prepare.RowFormat, max_open: int = 64):
    self.directory, self.fmt, self.max_open = directory, fmt, max_open
    self.files = [s["file"] for s in split["shards"]]
    counts = np.asarray([s["rows"] for s in split["shards"]], np.int64)
    self.offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    self.rows = int(counts.sum())
    self._open: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()
    self._remote = prepare.has_scheme(directory)

  def _fd(self, shard: int) -> int:
    with self._lock:
      if shard in self._open:
        self._open.move_to_end(shard)
        return self._open[shard]
      fd = os.open(os.path.join(self.directory, self.files[shard]), os.O_RDONLY)
      self._open[shard] = fd
      while len(self._open) > self.max_open:
        os.close(self._open.popitem(last=False)[1])
      return fd

  def read(self, rows: np.ndarray) -> np.ndarray:
    """[n] int64 global row ids -> [n, row_bytes] uint8."""
    shard, offset = locate(self.offsets, rows, self.fmt.row_bytes)
    size = self.fmt.row_bytes
    if self._remote:
      import fsspec
      fs, base = fsspec.core.url_to_fs(self.directory)
      paths = [base.rstrip("/") + "/" + self.files[s] for s in shard]
      blobs = fs.cat_ranges(paths, offset.tolist(), (offset + size).tolist())
    else:
      blobs = [os.pread(self._fd(int(s)), size, int(o)) for s, o in zip(shard, offset)]
    if any(len(b) != size for b in blobs):
      raise DataError(f"{self.directory}: a shard is shorter than its index says; prepare it again")
    return np.frombuffer(b"".join(blobs), np.uint8).reshape(len(blobs), size)

  def close(self):
    with self._lock:
      while self._open:
        os.close(self._open.popitem()[1])


def _load_index(directory: str) -> dict:
  path = prepare.join(directory, prepare.INDEX)
  if not prepare.exists(path):
    what = ("does not exist" if not prepare.exists(directory) else
            f"has no {prepare.INDEX} (not a prepared corpus, or its prepare did not finish)")
    raise DataError(f"DataConfig.prepared_dir={directory!r} {what}; write one with `bigmodel data "
                    f"prepare --gin_file=RECIPE --out {directory}`")
  try:
    with prepare.open_file(path, "r") as f:
      index = json.load(f)
    ok = index.get("format") == prepare.FORMAT and "splits" in index
  except (ValueError, UnicodeDecodeError) as e:
    raise DataError(f"{path} is corrupt ({e}); prepare the corpus again") from None
  if not ok:
    raise DataError(f"{path} is not a bigmodel prepared-corpus index (format "
                    f"{index.get('format')!r}, expected {prepare.FORMAT!r}); prepare the corpus again")
  if index.get("version") != prepare.VERSION:
    raise DataError(f"{path} has format version {index.get('version')}; this bigmodel reads "
                    f"version {prepare.VERSION}: prepare the corpus again")
  return index


def _check_shards(directory: str, index: dict) -> None:
  """Every shard listed exists with the size its row count gives (one listing, not a read)."""
  sizes = {}
  if prepare.has_scheme(directory):
    import fsspec
    fs, base = fsspec.core.url_to_fs(directory)
    sizes = {os.path.basename(i["name"]): i["size"] for i in fs.ls(base, detail=True)}
  else:
    sizes = {e.name: e.stat().st_size for e in os.scandir(directory)}
  for split, info in index["splits"].items():
    for s in info["shards"]:
      want = s["rows"] * index["row_bytes"]
      if s["file"] not in sizes:
        raise DataError(f"{directory}: shard {s['file']} of the {split} split is missing; "
                        f"prepare the corpus again")
      if sizes[s["file"]] != want:
        raise DataError(f"{directory}: shard {s['file']} holds {sizes[s['file']]} bytes, its index "
                        f"says {s['rows']} rows = {want} bytes (truncated or overwritten); prepare "
                        f"the corpus again")


def load_tokenizer(directory: str):
  if not prepare.has_scheme(directory):
    return tokenizers.load(directory)
  tmp = tempfile.mkdtemp(prefix="bigmodel-tokenizer-")   # kept: a SentencePiece model reads it
  for name in prepare.TOKENIZER_FILES:
    src = prepare.join(directory, name)
    if prepare.exists(src):
      with prepare.open_file(src) as f, open(os.path.join(tmp, name), "wb") as g:
        g.write(f.read())
  return tokenizers.load(tmp)


class PreparedLMData:
  """train_batches / eval_batches (data/lm.py's LMData API) over a prepared directory."""

  def __init__(self, cfg: DataConfig, index: dict, tokenizer):
    self.cfg, self.index, self.tokenizer = cfg, index, tokenizer
    self.directory = cfg.prepared_dir
    self.fmt = prepare.RowFormat(index["seq_len"], index["token_dtype"])
    self.readers = {s: ShardReader(self.directory, index["splits"][s], self.fmt)
                    for s in ("train", "val")}
    self.source = f"prepared {self.directory}"
    # what fixes the data order, for a checkpoint to record: the index names every shard and row count
    self.fingerprint = hashlib.sha256(json.dumps(index, sort_keys=True).encode()).hexdigest()[:16]
    self.stride = index["window_stride"]

  @classmethod
  def build(cls, cfg: DataConfig, tokenizer=None) -> "PreparedLMData":
    index = _load_index(cfg.prepared_dir)
    _check_shards(cfg.prepared_dir, index)
    stride = cfg.window_stride or cfg.seq_len
    for name, want, have in (("seq_len", cfg.seq_len, index["seq_len"]),
                             ("window_stride", stride, index["window_stride"])):
      if want != have:
        raise DataError(f"DataConfig.{name}={want} but {cfg.prepared_dir} was prepared with "
                        f"{name} {have}: set it to {have}, or prepare the corpus again with {want}")
    if tokenizer is None:
      tokenizer = load_tokenizer(cfg.prepared_dir)
    elif tokenizer.vocab_size != index["vocab_size"]:
      raise DataError(f"the run's tokenizer has {tokenizer.vocab_size} ids, {cfg.prepared_dir} was "
                      f"tokenized with {index['vocab_size']}: use the prepared directory's tokenizer")
    train, val = index["splits"]["train"], index["splits"]["val"]
    if val["rows"] == 0:
      raise DataError(f"{cfg.prepared_dir} has no validation rows; prepare it with "
                      f"DataConfig.val_files or a larger DataConfig.val_fraction")
    log.info("data: prepared %s; %d train rows (%d tokens), %d validation rows, %d shards, "
             "vocab %d", cfg.prepared_dir, train["rows"], train["tokens"], val["rows"],
             len(train["shards"]), tokenizer.vocab_size)
    return cls(cfg, index, tokenizer)

  def _rows_fn(self, split: str):
    reader = self.readers[split]

    def rows(row_ids, real):
      def np_rows(ids, keep):
        out = decode_rows(reader.read(ids), self.fmt)
        out["weights"] *= keep[:, None]
        return [out[k] for k in FIELDS]
      outs = tf.numpy_function(np_rows, [row_ids, tf.cast(real, tf.float32)],
                               [tf.int32] * 4 + [tf.float32], stateful=False)
      shape = (row_ids.shape[0], self.fmt.seq_len)
      return {k: tf.ensure_shape(o, shape) for k, o in zip(FIELDS, outs)}
    return rows

  def _batches(self, split: str, global_batch: int, start: int, stop: int, host_rows, shuffle: bool):
    first, per_host = host_rows or (0, global_batch)
    n = self.readers[split].rows
    rows = self._rows_fn(split)

    def make(step):
      k = step * global_batch + first + tf.range(per_host, dtype=tf.int64)
      if shuffle:
        return rows(lm._shuffled(k, n, self.cfg.seed), tf.ones_like(k, tf.bool))
      return rows(k % n, k < n)       # an eval pass: rows past the end are padding of weight 0

    ds = tf.data.Dataset.range(start, stop).map(make, num_parallel_calls=tf.data.AUTOTUNE,
                                                deterministic=True)
    return ds.prefetch(2)

  def train_batches(self, global_batch: int, start_step: int = 0,
                    host_rows: tuple[int, int] | None = None) -> tf.data.Dataset:
    n = self.readers["train"].rows
    if global_batch > n:
      raise DataError(f"{self.directory} has {n} training rows, fewer than one batch of "
                      f"{global_batch}; add data or lower BATCH_SIZE")
    stop = np.iinfo(np.int64).max // (2 * global_batch)
    return self._batches("train", global_batch, start_step, stop, host_rows, shuffle=True)

  def eval_batches(self, global_batch: int, host_rows: tuple[int, int] | None = None) -> tf.data.Dataset:
    n = self.readers["val"].rows
    steps = max(1, min(self.cfg.eval_batches, -(-n // global_batch)))
    return self._batches("val", global_batch, 0, steps, host_rows, shuffle=False)
