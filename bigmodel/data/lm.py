"""Language-model input: documents -> token stream -> packed rows -> global batches.

Documents are tokenized once (EOS after each when the tokenizer has one) and
concatenated into one stream. A row is a window of `seq_len + 1` tokens starting
every `window_stride` tokens; documents pack into rows back to back, and each
token carries its document as segment id, so attention never crosses a boundary
and positions restart at each document.

The pipeline is a pure function of (seed, example index): the batch at step i is
examples [i*B, (i+1)*B) of a per-epoch stateless shuffle (`index_shuffle`). The data
position in a checkpoint is therefore the step, and resuming is exact. Each host
builds only its slice of every global batch, which `jax.make_array_from_process_local_data`
turns into one global array sharded over (data, fsdp).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Iterator

import jax
import numpy as np
from bigmodel.data import lazy_tf as tf  # imported at first use: see bigmodel/data/__init__.py

from bigmodel.config import DataConfig
from bigmodel.data import sources, tokenizers
from bigmodel.data.sources import DataError

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TokenStream:
  tokens: np.ndarray       # int32 [n]
  doc_start: np.ndarray    # int32 [n]: index in the stream where each token's document starts

  def __len__(self):
    return len(self.tokens)

  @classmethod
  def from_documents(cls, docs, tokenizer, add_eos: bool) -> "TokenStream":
    pieces, starts, offset = [], [], 0
    eos = tokenizer.eos_id if add_eos else None
    for doc in docs:
      ids = tokenizers.encode_ordinary(tokenizer, doc)   # raw text: no control tokens
      if eos is not None:
        ids = np.append(ids, np.int32(eos))
      pieces.append(ids.astype(np.int32))
      starts.append(np.full(len(ids), offset, np.int32))
      offset += len(ids)
    if not pieces:
      return cls(np.zeros(0, np.int32), np.zeros(0, np.int32))
    return cls(np.concatenate(pieces), np.concatenate(starts))

  def split(self, fraction: float) -> tuple["TokenStream", "TokenStream"]:
    """First (1 - fraction) of tokens, then the rest (documents cut at the seam)."""
    cut = int(round(len(self) * (1 - fraction)))
    tail_start = np.maximum(self.doc_start[cut:] - cut, 0).astype(np.int32)
    return TokenStream(self.tokens[:cut], self.doc_start[:cut]), TokenStream(self.tokens[cut:], tail_start)


def num_rows(n_tokens: int, seq_len: int, stride: int) -> int:
  return max(0, (n_tokens - (seq_len + 1)) // stride + 1)


def _rows_fn(stream: TokenStream, seq_len: int, stride: int):
  """Returns f(row_ids [n]) -> dict of [n, seq_len] tensors."""
  tokens = tf.constant(stream.tokens)
  doc_start = tf.constant(stream.doc_start)
  offsets = tf.range(seq_len + 1, dtype=tf.int32)

  def rows(row_ids):
    starts = tf.cast(row_ids, tf.int32) * stride
    idx = starts[:, None] + offsets[None, :]                  # [n, T+1]
    tok = tf.gather(tokens, idx)
    dst = tf.gather(doc_start, idx)
    same_doc = tf.cast(tf.equal(dst[:, 1:], dst[:, :-1]), tf.float32)
    positions = idx[:, :-1] - tf.maximum(dst[:, :-1], starts[:, None])
    return {
        "inputs": tok[:, :-1],
        "targets": tok[:, 1:],
        "positions": positions,
        "segment_ids": dst[:, :-1] + 1,                          # 0 is reserved for padding
        "weights": same_doc,
    }
  return rows


def _shuffled(k, n_rows: int, seed: int):
  """Example indices k (one batch, ascending) -> row ids, reshuffled every epoch."""
  epoch = k // n_rows
  within = k % n_rows
  first = epoch[0]
  shuffle = lambda e: tf.random.experimental.index_shuffle(
      within, seed=tf.stack([tf.constant(seed, tf.int64), e]),
      max_index=n_rows - 1)
  return tf.where(epoch == first, shuffle(first), shuffle(first + 1))


def batches(stream: TokenStream, seq_len: int, stride: int, global_batch: int, *, seed: int,
            shuffle: bool, start_step: int = 0, num_steps: int | None = None,
            host_rows: tuple[int, int] | None = None,
            pad_past_end: bool = False) -> tf.data.Dataset:
  """This host's rows of global batches start_step, start_step+1, ... as a tf.data pipeline.

  host_rows: (first row, count) of each global batch that this host feeds (default: all).
  pad_past_end: one pass (an evaluation): example indices past the last row fill the last
    batch with rows from the start at weight 0, so that every row is scored exactly once.
  """
  n_rows = num_rows(len(stream), seq_len, stride)
  if n_rows == 0:
    raise DataError(f"the dataset has {len(stream)} tokens, fewer than one row of "
                    f"seq_len + 1 = {seq_len + 1}; add data or lower SEQ_LEN")
  if shuffle and global_batch > n_rows:
    raise DataError(f"the dataset has {n_rows} rows of {seq_len + 1} tokens, fewer than one batch "
                    f"of {global_batch}; add data, or lower BATCH_SIZE or SEQ_LEN")
  first_row, per_host = host_rows or (0, global_batch)
  rows = _rows_fn(stream, seq_len, stride)
  stop = start_step + num_steps if num_steps is not None else np.iinfo(np.int64).max // global_batch

  def make(step):
    k = step * global_batch + first_row + tf.range(per_host, dtype=tf.int64)
    row_ids = _shuffled(k, n_rows, seed) if shuffle else k % n_rows
    out = rows(row_ids)
    if pad_past_end:
      out["weights"] *= tf.cast(k < n_rows, tf.float32)[:, None]
    return out

  ds = tf.data.Dataset.range(start_step, stop).map(make, num_parallel_calls=tf.data.AUTOTUNE,
                                                   deterministic=True)
  return ds.prefetch(2)


@dataclasses.dataclass
class LMData:
  """Train/validation streams and their tokenizer, for one run."""
  cfg: DataConfig
  tokenizer: object
  train: TokenStream
  val: TokenStream
  source: str

  @classmethod
  def build(cls, cfg: DataConfig, tokenizer=None) -> "LMData":
    """The in-memory pipeline of `files`/TFDS; with DataConfig.prepared_dir set, the streaming
    one over prepared shards (bigmodel.data.shards), which has the same batch API."""
    if cfg.prepared_dir:
      from bigmodel.data import shards   # it builds on this module
      return shards.PreparedLMData.build(cfg, tokenizer)
    train_docs, val_docs, source = sources.lm_documents(cfg)
    if not any(d.strip() for d in train_docs):
      raise DataError(f"the training data ({source}) is empty: it holds no text")
    if tokenizer is None:
      tokenizer = tokenizers.build(cfg.tokenizer, train_docs)
    stream = TokenStream.from_documents(train_docs, tokenizer, cfg.add_eos)
    if val_docs is None:
      train, val = stream.split(cfg.val_fraction)
    else:
      train, val = stream, TokenStream.from_documents(val_docs, tokenizer, cfg.add_eos)
    log.info("data: %s; %d train tokens, %d validation tokens, vocab %d", source, len(train),
             len(val), tokenizer.vocab_size)
    return cls(cfg, tokenizer, train, val, source)

  @property
  def stride(self) -> int:
    return self.cfg.window_stride or self.cfg.seq_len

  def train_batches(self, global_batch: int, start_step: int = 0,
                    host_rows: tuple[int, int] | None = None) -> tf.data.Dataset:
    return batches(self.train, self.cfg.seq_len, self.stride, global_batch, seed=self.cfg.seed,
                   shuffle=True, start_step=start_step, host_rows=host_rows)

  def eval_batches(self, global_batch: int, host_rows: tuple[int, int] | None = None) -> tf.data.Dataset:
    n_rows = num_rows(len(self.val), self.cfg.seq_len, self.cfg.seq_len)
    steps = max(1, min(self.cfg.eval_batches, -(-n_rows // global_batch)))
    return batches(self.val, self.cfg.seq_len, self.cfg.seq_len, global_batch, seed=self.cfg.seed,
                   shuffle=False, num_steps=steps, host_rows=host_rows, pad_past_end=True)


def epoch_permutation(seed: int, epoch: int, n: int, salt: int) -> np.ndarray:
  """The order of a table's n rows in one epoch: a pure function of (seed, epoch, salt)."""
  return _cached_permutation(seed, epoch, n, salt).copy()


@functools.lru_cache(maxsize=8)
def _cached_permutation(seed: int, epoch: int, n: int, salt: int) -> np.ndarray:
  return np.random.default_rng([seed, epoch, salt]).permutation(n)


def epoch_rows(keys: np.ndarray, n: int, seed: int, salt: int) -> np.ndarray:
  """Global example keys -> table rows: key k is row epoch_permutation(seed, k // n)[k % n], so
  every epoch visits each row once in a fresh order and resuming at any key is exact. The
  salt keeps pipelines (BERT pairs, task tables) on separate shuffle streams."""
  epochs, within = keys // n, keys % n
  idx = np.empty_like(keys)
  for e in np.unique(epochs):
    sel = epochs == e
    idx[sel] = _cached_permutation(seed, int(e), n, salt)[within[sel]]
  return idx


POISSON_SALT = 0x706f6973


@functools.lru_cache(maxsize=8)
def poisson_sample(seed: int, step: int, n: int, batch: int, salt: int) -> np.ndarray:
  """The rows of Poisson batch `step`: each of n rows with probability batch / n, then (if more
  than `batch`) a uniformly random subset of `batch` of them; a pure function of the arguments."""
  rng = np.random.default_rng([seed, step, salt, POISSON_SALT])
  chosen = np.flatnonzero(rng.random(n) < batch / n)
  if len(chosen) > batch:
    chosen = rng.choice(chosen, batch, replace=False)
  return rng.permutation(chosen)


def poisson_rows(keys: np.ndarray, n: int, batch: int, seed: int, salt: int):
  """Example keys (batch k // batch, slot k % batch) -> (table rows, real): slots past the
  batch's sample are padding (row 0, real False)."""
  steps, slots = keys // batch, keys % batch
  idx, real = np.zeros_like(keys), np.zeros(len(keys), bool)
  for s in np.unique(steps):
    sel = steps == s
    chosen = poisson_sample(seed, int(s), n, batch, salt)
    ok = slots[sel] < len(chosen)
    idx[sel] = np.where(ok, chosen[np.minimum(slots[sel], max(len(chosen) - 1, 0))] if len(chosen)
                        else 0, 0)
    real[sel] = ok
  return idx, real


def keyed_batches(rows_fn, shapes: dict, float_keys, global_batch: int, start: int, stop: int,
                  host_rows: tuple[int, int] | None) -> tf.data.Dataset:
  """Global batches start..stop-1 of a pipeline built in numpy, one row per example key.

  Example key k (global batch k // global_batch) is a row of `rows_fn(keys)`, a dict of
  numpy arrays; this host builds rows (first, count) = host_rows of every batch. `shapes`
  gives each field's per-row shape, in output order; `float_keys` are float32, the rest int32.
  Like `batches`, the result is a pure function of the step, so resuming is exact.
  """
  first, count = host_rows or (0, global_batch)
  keys = list(shapes)
  dtypes = [tf.float32 if k in float_keys else tf.int32 for k in keys]

  def np_batch(step):
    example_keys = int(step) * global_batch + first + np.arange(count, dtype=np.int64)
    batch = rows_fn(example_keys)
    return [batch[k] for k in keys]

  def make(step):
    outs = tf.numpy_function(np_batch, [step], dtypes, stateful=False)
    return {k: tf.ensure_shape(o, (count,) + tuple(shapes[k])) for k, o in zip(keys, outs)}

  ds = tf.data.Dataset.range(start, stop).map(make, num_parallel_calls=tf.data.AUTOTUNE,
                                              deterministic=True)
  return ds.prefetch(2)


class KeyedTable:
  """train_batches / eval_batches for a pipeline whose rows are pure functions of global
  example keys. A subclass has `cfg`, sized `train` and `val` tables, a `shuffle_salt` (its own
  stream of per-epoch shuffles) and gives `_rows(table, idx, real)` (the rows at idx; `real`
  false for the padding past the end of an eval pass, which must weigh 0) and `row_shapes()`
  (key -> per-row shape; `weights` is the float key).
  Train batches run on forever from any step; eval batches cover every eval row once."""
  shuffle_salt: int   # set by each subclass

  def row_shapes(self) -> dict:
    raise NotImplementedError

  def _rows(self, table, idx: np.ndarray, real: np.ndarray) -> dict:
    raise NotImplementedError

  poisson_batch: int = 0   # > 0: Poisson-sampled train batches (DP-SGD), see use_poisson

  def use_poisson(self, global_batch: int) -> None:
    """Train batches by truncated Poisson sampling (DP-SGD, train/dp.py): batch t holds every
    train row with probability q = global_batch / n, independently, a random subset of them if
    more than global_batch, then weight-0 padding rows."""
    self.poisson_batch = global_batch

  def train_rows(self, keys: np.ndarray) -> dict:
    if self.poisson_batch:
      idx, real = poisson_rows(keys, len(self.train), self.poisson_batch, self.cfg.seed,
                               self.shuffle_salt)
      return self._rows(self.train, idx, real)
    idx = epoch_rows(keys, len(self.train), self.cfg.seed, self.shuffle_salt)
    return self._rows(self.train, idx, np.ones(len(keys), bool))

  def eval_rows(self, keys: np.ndarray) -> dict:
    n = len(self.val)
    return self._rows(self.val, keys % n, keys < n)

  def train_batches(self, global_batch: int, start_step: int = 0, host_rows=None) -> tf.data.Dataset:
    stop = np.iinfo(np.int64).max // (2 * global_batch)
    return keyed_batches(self.train_rows, self.row_shapes(), ("weights",), global_batch,
                         start_step, stop, host_rows)

  def eval_batches(self, global_batch: int, host_rows=None) -> tf.data.Dataset:
    """Every eval row (DataConfig.eval_batches does not cut these evals short)."""
    steps = -(-len(self.val) // global_batch)
    return keyed_batches(self.eval_rows, self.row_shapes(), ("weights",), global_batch, 0,
                         steps, host_rows)


def to_global(batch: dict, sharding) -> dict:
  """Host-local numpy slices -> global jax.Arrays with the batch sharding."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def global_iterator(ds: tf.data.Dataset, sharding) -> Iterator[dict]:
  for batch in ds.as_numpy_iterator():
    yield to_global(batch, sharding)
