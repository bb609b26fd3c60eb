"""Sequence-classification input: a TSV/CSV/JSONL file -> `[CLS] A [SEP] (B [SEP])` rows.

  DataConfig.files[0]      the train file; DataConfig.val_files[0] the eval file (relative
                           paths that do not exist here are read under DataConfig.data_dir)
  ClassificationConfig.text_columns  one column (single sentences) or two (sentence pairs)
  ClassificationConfig.label_column  the label; ClassificationConfig.labels the label set in id order, else
                           inferred from the train file (an unseen eval label is an error)
  ClassificationConfig.column_names  for headerless files
  DataConfig.seq_len       rows are truncated to it (pairs: the longer side first); the count
                           of truncated rows is logged

Tokenization uses the model's tokenizer: an imported WordPiece (`hf_tokenizers`, with its own
[CLS]/[SEP] template) or any tokenizer with [CLS] and [SEP] pieces. For a decoder
(objective `decoder_classification`) rows are `A (EOS B) EOS` with no [CLS]/[SEP]: the
classifier reads the last real token, so every row ends on the same EOS marker (dropped for
tokenizers without one); the end is kept when a row is truncated.

Files may also be TFDS splits, `tfds:glue/sst2:train` (see `readers.read_table`).

Batches are a pure function of (seed, step), as in `data/lm.py` and `data/bert.py`: global
example k is row `permutation(seed, k // n)[k % n]` of the train table, so resuming is exact.
Eval batches cover every eval row in order; a partial last batch is padded with weight-0 rows.

Batch (numpy, this host's rows): input_ids, input_mask, segment_ids int32 [b, s];
labels int32 [b]; weights float32 [b].
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from bigmodel.config import DataConfig
from bigmodel.data import readers, tokenizers
from bigmodel.data.lm import KeyedTable
from bigmodel.data.sources import DataError

log = logging.getLogger(__name__)

KEYS = ("input_ids", "input_mask", "segment_ids", "labels", "weights")


@dataclasses.dataclass
class Table:
  input_ids: np.ndarray     # int32 [n, s]
  input_mask: np.ndarray    # int32 [n, s]
  segment_ids: np.ndarray   # int32 [n, s]
  labels: np.ndarray        # int32 [n] (-1: unlabeled)
  truncated: int = 0

  def __len__(self):
    return len(self.labels)


def encode_decoder(tokenizer, texts: list[tuple[str, ...]], seq_len: int) -> Table:
  """Rows of one or two texts -> left-aligned `A (EOS B) EOS` arrays, padded with 0 (masked)."""
  eos = getattr(tokenizer, "eos_id", None)
  if eos is None and texts and len(texts[0]) > 1:
    raise DataError(f"a sentence-pair decoder classifier joins A and B with EOS, and the "
                    f"{type(tokenizer).__name__} tokenizer has none; use a tokenizer with EOS "
                    f"(byte, SentencePiece, GPT-2 BPE) or one text column")
  n = len(texts)
  ids = np.zeros((n, seq_len), np.int32)
  mask = np.zeros((n, seq_len), np.int32)
  truncated = 0
  for r, row in enumerate(texts):
    toks: list[int] = []
    for i, t in enumerate(row):
      if i:
        toks.append(eos)
      toks += list(tokenizers.encode_ordinary(tokenizer, t))
    if eos is not None:
      toks.append(eos)
    if len(toks) > seq_len:
      truncated += 1
      toks = toks[:seq_len - 1] + toks[-1:]     # keep the final marker
    ids[r, :len(toks)], mask[r, :len(toks)] = toks, 1
  return Table(ids, mask, np.zeros_like(ids), np.full(n, -1, np.int32), truncated)


def encode(tokenizer, texts: list[tuple[str, ...]], seq_len: int, decoder: bool = False) -> Table:
  """Rows of one or two texts -> padded [CLS] A [SEP] (B [SEP]) arrays (no labels); for a
  decoder, `encode_decoder`."""
  if decoder:
    return encode_decoder(tokenizer, texts, seq_len)
  if hasattr(tokenizer, "batch") and hasattr(tokenizer, "tok"):    # imported WordPiece
    firsts = [t[0] for t in texts]
    pairs = [t[1] for t in texts] if texts and len(texts[0]) > 1 else None
    inputs = firsts if pairs is None else list(zip(firsts, pairs))
    lengths = np.array([len(ids) for ids in tokenizer.encode_batch(inputs, add_special_tokens=True,
                                                                   split_special_tokens=True)])
    b = tokenizer.batch(firsts, pairs, max_len=seq_len, pad_to=seq_len, split_special_tokens=True)
    ids, mask, seg = b["input_ids"], b["attention_mask"], b["token_type_ids"]
  else:
    try:
      cls_id, sep_id = tokenizer.piece_to_id("[CLS]"), tokenizer.piece_to_id("[SEP]")
    except (AttributeError, KeyError):
      raise DataError(f"classification needs a tokenizer with [CLS] and [SEP]; "
                      f"{type(tokenizer).__name__} has none") from None
    pad = getattr(tokenizer, "pad_id", 0) or 0
    n = len(texts)
    ids = np.full((n, seq_len), pad, np.int32)
    mask = np.zeros((n, seq_len), np.int32)
    seg = np.zeros((n, seq_len), np.int32)
    lengths = np.zeros(n, np.int64)
    for r, row in enumerate(texts):
      parts = [list(tokenizers.encode_ordinary(tokenizer, t)) for t in row]
      lengths[r] = sum(len(p) for p in parts) + len(parts) + 1
      budget = seq_len - len(parts) - 1
      while sum(len(p) for p in parts) > budget:
        longest = max(range(len(parts)), key=lambda i: len(parts[i]))
        parts[longest].pop()
      toks, types = [cls_id], [0]
      for i, p in enumerate(parts):
        toks += p + [sep_id]
        types += [i] * (len(p) + 1)
      ids[r, :len(toks)], mask[r, :len(toks)], seg[r, :len(toks)] = toks, 1, types
  return Table(ids.astype(np.int32), mask.astype(np.int32), seg.astype(np.int32),
               np.full(len(texts), -1, np.int32), int(np.sum(lengths > seq_len)))


SHUFFLE_SALT = 0x636c73   # this pipeline's stream of per-epoch shuffles (data.lm.epoch_rows)


@dataclasses.dataclass
class ClassificationData(KeyedTable):
  shuffle_salt = SHUFFLE_SALT   # a class attribute, not a field
  cfg: DataConfig
  tokenizer: object
  labels: readers.LabelSet
  train: Table
  val: Table
  source: str

  decoder: bool = False

  @classmethod
  def build(cls, cfg: DataConfig, tokenizer=None, decoder: bool = False) -> "ClassificationData":
    if not cfg.files:
      raise DataError("classification needs a train file: DataConfig.files = [%TRAIN_FILE]")
    if not cfg.text_columns:
      raise DataError("classification needs ClassificationConfig.text_columns (TEXT_COLUMNS): the text column(s)")
    if not cfg.label_column:
      raise DataError("classification needs ClassificationConfig.label_column (LABEL_COLUMN)")
    if tokenizer is None:
      tokenizer = tokenizers.build(cfg.tokenizer)
    train_path = readers.resolve(cfg.files[0], cfg.data_dir)
    val_path = readers.resolve(cfg.val_files[0], cfg.data_dir) if cfg.val_files else ""
    texts, labels = readers.read_classification(train_path, cfg.text_columns, cfg.label_column,
                                                cfg.column_names)
    texts = _scrubbed(cfg, texts, train_path)
    label_set = readers.LabelSet(tuple(cfg.labels)) if cfg.labels else readers.LabelSet.infer(labels)
    train = encode(tokenizer, texts, cfg.seq_len, decoder)
    train.labels = np.asarray(label_set.ids(labels, train_path), np.int32)
    if val_path:
      val = load_eval(cfg, tokenizer, label_set, val_path, decoder=decoder)
    else:
      raise DataError("classification needs an eval file: DataConfig.val_files = [%EVAL_FILE]")
    for name, t, path in (("train", train, train_path), ("eval", val, val_path)):
      if t.truncated:
        log.warning("%s: %d of %d rows are longer than seq_len=%d tokens and were truncated",
                    path, t.truncated, len(t), cfg.seq_len)
    log.info("classification data: %d train rows (%s), %d eval rows (%s), %d labels, %d+%d truncated",
             len(train), train_path, len(val), val_path, len(label_set), train.truncated, val.truncated)
    return cls(cfg, tokenizer, label_set, train, val, train_path, decoder)

  # --- batches, a pure function of (seed, step)

  def _rows(self, table: Table, idx: np.ndarray, real: np.ndarray) -> dict:
    return {"input_ids": table.input_ids[idx], "input_mask": table.input_mask[idx],
            "segment_ids": table.segment_ids[idx], "labels": np.maximum(table.labels[idx], 0),
            "weights": real.astype(np.float32)}

  def row_shapes(self) -> dict:
    s = self.cfg.seq_len
    shapes = {"input_ids": (s,), "input_mask": (s,), "segment_ids": (s,), "labels": (), "weights": ()}
    assert tuple(shapes) == KEYS
    return shapes


def load_eval(cfg: DataConfig, tokenizer, label_set: readers.LabelSet, path: str,
              with_labels: bool = True, decoder: bool = False) -> Table:
  """An eval or prediction file, encoded; labels checked against the label set."""
  texts, labels = readers.read_classification(path, cfg.text_columns,
                                              cfg.label_column if with_labels else "",
                                              cfg.column_names)
  table = encode(tokenizer, _scrubbed(cfg, texts, path), cfg.seq_len, decoder)
  if labels is not None:
    table.labels = np.asarray(label_set.ids(labels, path), np.int32)
  return table


def read_texts(cfg: DataConfig, path: str) -> list[tuple[str, ...]]:
  return _scrubbed(cfg, readers.read_classification(path, cfg.text_columns, "", cfg.column_names)[0],
                   path)


def _scrubbed(cfg: DataConfig, texts: list[tuple[str, ...]], path: str) -> list[tuple[str, ...]]:
  """The texts with PII replaced by placeholders when DataConfig.scrub_pii is on."""
  if not cfg.scrub_pii:
    return texts
  from bigmodel.data import pii
  out = pii.scrub_rows(texts)
  pii.report(path)
  return out
