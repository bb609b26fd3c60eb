"""Token-classification (NER) input: sentences of (words, tags) -> `[CLS] pieces [SEP]` rows
with one label per word, on the word's first sub-word.

Sources (`NerData.build`):
  DataConfig.files[0], val_files[0]   CoNLL column files (blank lines between sentences,
                                      `-DOCSTART-` lines skipped; relative paths that do not
                                      exist here are read under DataConfig.data_dir)
  NerConfig.token_column, tag_column the word and tag columns (0-based; -1 is the last)
  DataConfig.tfds_name                with no files: a TFDS CoNLL dataset (e.g. 'conll2003':
                                      `ner_tfds_tokens_key`, `ner_tfds_tags_key`, splits
                                      'train' and `ner_tfds_eval_split`)
  NerConfig.labels                   the tag set in id order; default: inferred from the
                                      train data ('O' first, then by type, B- before I-), or
                                      the TFDS ClassLabel names. A tag of the eval data
                                      outside the set is an error that names it and its line.
  NerConfig.ner_tag_scheme           'iob2' (BIO; tags used as they are) or 'iob1'
                                      (converted to IOB2 when read)

Alignment: each word is tokenized on its own (the imported WordPiece encodes the pre-split
words with `is_pretokenized=True`; SentencePiece models with [CLS]/[SEP] pieces encode
word by word). The word's tag id goes on its first sub-word; later sub-words, [CLS], [SEP]
and padding get label -1 and weight 0, so they are ignored by the loss. A word that yields
no sub-word at all (e.g. a lone control character) is encoded as [UNK].

Truncation: rows hold at most seq_len pieces ([CLS] and [SEP] included). The words of a
longer sentence whose first sub-word does not fit are dropped from the row; the count of
such sentences (and words) is logged. `bigmodel evaluate` / `predict` encode their input
again at `ner_eval_seq_len` (default seq_len) and tag the words dropped there "O" (see
`bigmodel.evaluation.ner`): they stay in the metric as such, so gold entities there count
as missed, never vanish silently. (The in-training eval, loss and accuracy, covers the
kept words of rows of seq_len.)

Batches are a pure function of (seed, step), as in `data/finetune.py`. Batch (numpy, this
host's rows): input_ids, input_mask, segment_ids, labels int32 [b, s] (labels 0 where
ignored), label_weights float32 [b, s] (1 on first sub-words of real rows, else 0).
With `NerConfig.ner_length_buckets` (e.g. [16, 32, 64, 128]) s varies by batch: sentences
of similar length are batched together (sorted within windows of 50 batches of each
epoch's permutation, the batch order shuffled) and each batch is cut to the smallest
bucket that holds its longest row, so little compute goes to padding (one compile per
bucket). Eval batches are then sorted by length the same way.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Sequence

import numpy as np
from bigmodel.data import lazy_tf as tf  # imported at first use: see bigmodel/data/__init__.py

from bigmodel.config import DataConfig
from bigmodel.data import readers, sources, tokenizers
from bigmodel.data.lm import epoch_permutation, epoch_rows, keyed_batches
from bigmodel.data.sources import DataError

log = logging.getLogger(__name__)

KEYS = ("input_ids", "input_mask", "segment_ids", "labels", "label_weights")
SCHEMES = ("iob2", "iob1")
INPUT_FORMATS = ("auto", "conll", "text")

Sentence = tuple[list[str], list[str]]


# ----------------------------------------------------------------------------- tags


def iob1_to_iob2(tags: Sequence[str]) -> list[str]:
  """IOB1 (I- opens a chunk unless it continues one of the same type) -> IOB2 (every chunk
  opens with B-)."""
  out, prev = [], "O"
  for tag in tags:
    if tag.startswith("I-") and (prev == "O" or prev[2:] != tag[2:]):
      tag = "B-" + tag[2:]
    out.append(tag)
    prev = tag
  return out


def _tag_key(tag: str):
  if tag == "O":
    return (0, "", "")
  if len(tag) > 2 and tag[1] == "-":
    return (1, tag[2:], tag[0])
  return (1, tag, "")


def infer_tags(sentences: Sequence[Sentence]) -> readers.LabelSet:
  """The tag set of some sentences: 'O' first, then grouped by type, B- before I-."""
  seen = {t for _, tags in sentences for t in tags}
  return readers.LabelSet(tuple(sorted(seen, key=_tag_key)))


def tag_ids(label_set: readers.LabelSet, sentences: Sequence[Sentence], path: str,
            tag_column: int | None = None) -> list[np.ndarray]:
  """Per sentence, the ids of its tags; an unknown tag is a DataError naming it and where."""
  index = {n: i for i, n in enumerate(label_set.names)}
  out = []
  for s, (words, tags) in enumerate(sentences):
    for w, tag in enumerate(tags):
      if tag not in index:
        where = _find_tag_line(path, tag, tag_column) if tag_column is not None else None
        shown = list(label_set.names) if len(label_set) <= 30 else list(label_set.names[:30]) + ["..."]
        at = f"line {where}" if where else f"sentence {s + 1}, word {w + 1}"
        raise DataError(f"{path}, {at}: the tag {tag!r} (word {words[w]!r}) is not in the tag set "
                        f"{shown}. Set NerConfig.labels (LABELS) to the full tag set (by "
                        f"default it is inferred from the training data).")
    out.append(np.asarray([index[t] for t in tags], np.int32))
  return out


def _find_tag_line(path: str, tag: str, tag_column: int) -> int | None:
  """The first line of a CoNLL file whose tag column holds `tag` (for error messages)."""
  try:
    with open(path, encoding="utf-8-sig") as f:
      for n, line in enumerate(f, 1):
        fields = line.split()
        try:
          if fields and fields[0] != "-DOCSTART-" and fields[tag_column] == tag:
            return n
        except IndexError:
          continue
  except OSError:
    pass
  return None


# ----------------------------------------------------------------------------- reading


def read_conll(path: str, cfg: DataConfig) -> list[Sentence]:
  """Sentences of a CoNLL file (readers.read_conll), tags converted per ner_tag_scheme."""
  if cfg.ner_tag_scheme not in SCHEMES:
    raise DataError(f"NerConfig.ner_tag_scheme={cfg.ner_tag_scheme!r}: expected one of {SCHEMES}")
  try:
    sentences = readers.read_conll(path, cfg.token_column, cfg.tag_column)
  except DataError as e:
    if "columns, but" in str(e):
      raise DataError(f"{e}. Set TOKEN_COLUMN / TAG_COLUMN (NerConfig.token_column, "
                      f"tag_column; 0-based, -1 is the last column).") from None
    raise
  if cfg.ner_tag_scheme == "iob1":
    sentences = [(w, iob1_to_iob2(t)) for w, t in sentences]
  if cfg.scrub_pii:     # token by token: a phone number split over tokens is not found
    from bigmodel.data import pii
    sentences = [(pii.scrub_all(w), t) for w, t in sentences]
    pii.report(path)
  return sentences


def read_words(path: str, cfg: DataConfig) -> tuple[list[list[str]], list[list[str]] | None]:
  """A prediction input: (words per sentence, gold tags per sentence or None).

  CoNLL (the token column; tags too when every word line has the tag column), or plain text
  with one whitespace-tokenized sentence a line. `ner_input_format='auto'` reads CoNLL when
  the file has a -DOCSTART- line, or blank lines between sentences and the same number of
  columns on every line; else plain text.
  """
  text = readers._read_text(path)
  fmt = cfg.ner_input_format
  if fmt not in INPUT_FORMATS:
    raise DataError(f"NerConfig.ner_input_format={fmt!r}: expected one of {INPUT_FORMATS}")
  lines = text.splitlines()
  if fmt == "auto":
    fmt = "conll" if _looks_like_conll(lines) else "text"
  if fmt == "text":
    words = [line.split() for line in lines if line.strip()]
    return words, None
  sentences, tags_ok, cur = [], True, []
  for n, line in enumerate(lines + [""], 1):
    fields = line.split()
    if not fields:
      if cur:
        sentences.append(cur)
        cur = []
      continue
    if fields[0] == "-DOCSTART-":
      continue
    try:
      tok = fields[cfg.token_column]
    except IndexError:
      raise DataError(f"{path}, line {n}: {len(fields)} columns, but the token column is "
                      f"{cfg.token_column}. Set TOKEN_COLUMN (NerConfig.token_column).") from None
    try:
      tag = fields[cfg.tag_column] if len(fields) > 1 else None
    except IndexError:
      tag = None
    tags_ok = tags_ok and tag is not None
    cur.append((tok, tag))
  if not sentences:
    raise DataError(f"{path}: no sentences (only -DOCSTART- or blank lines)")
  words = [[w for w, _ in s] for s in sentences]
  gold = [[t for _, t in s] for s in sentences] if tags_ok else None
  if gold is not None and cfg.ner_tag_scheme == "iob1":
    gold = [iob1_to_iob2(t) for t in gold]
  return words, gold


def _looks_like_conll(lines: list[str]) -> bool:
  if any(line.split()[:1] == ["-DOCSTART-"] for line in lines):
    return True
  body = list(lines)
  while body and not body[-1].strip():
    body.pop()
  counts = {len(line.split()) for line in body if line.strip()}
  return any(not line.strip() for line in body) and len(counts) == 1


def read_tfds(cfg: DataConfig, split: str) -> tuple[list[Sentence], tuple[str, ...]]:
  """(sentences, the ClassLabel tag names) of a TFDS CoNLL dataset split."""
  import tensorflow_datasets as tfds
  name = cfg.tfds_name
  try:
    builder = tfds.builder(name)
    feature = builder.info.features[cfg.ner_tfds_tags_key]
    names = tuple(feature.feature.names)
  except KeyError:
    raise DataError(f"TFDS {name!r} has no feature {cfg.ner_tfds_tags_key!r} "
                    f"(NerConfig.ner_tfds_tags_key)") from None
  except Exception as e:   # tfds raises many kinds; all mean "cannot get this dataset"
    raise DataError(f"could not load TFDS dataset {name!r} split {split!r}: {e}. With no network, "
                    f"point TRAIN_FILE / EVAL_FILE at CoNLL files instead.") from None
  sentences = []
  for ex in sources.tfds_examples(name, split, None,
                                  "point TRAIN_FILE / EVAL_FILE at CoNLL files instead"):
    if cfg.ner_tfds_tokens_key not in ex:
      raise DataError(f"TFDS {name!r} has no field {cfg.ner_tfds_tokens_key!r}; fields: {sorted(ex)}")
    words = [w.decode("utf-8") for w in ex[cfg.ner_tfds_tokens_key]]
    tags = [names[int(i)] for i in ex[cfg.ner_tfds_tags_key]]
    if len(words) != len(tags):
      raise DataError(f"TFDS {name!r} split {split!r}: an example has {len(words)} tokens but "
                      f"{len(tags)} tags")
    if words:
      sentences.append((words, tags))
  if not sentences:
    raise DataError(f"TFDS {name!r} split {split!r} holds no sentences")
  if cfg.ner_tag_scheme == "iob1":
    sentences = [(w, iob1_to_iob2(t)) for w, t in sentences]
  return sentences, names


def tfds_tag_names(cfg: DataConfig) -> tuple[str, ...]:
  import tensorflow_datasets as tfds
  try:
    return tuple(tfds.builder(cfg.tfds_name).info.features[cfg.ner_tfds_tags_key].feature.names)
  except Exception as e:
    raise DataError(f"TFDS {cfg.tfds_name!r}: cannot read its tag names ({e}); set NerConfig.labels")


def train_files(cfg: DataConfig) -> tuple[str, str]:
  """(train path, eval path) of the run ('' where not given)."""
  files = [f for f in cfg.files if f]
  vals = [f for f in cfg.val_files if f]
  return (readers.resolve(files[0], cfg.data_dir) if files else "",
          readers.resolve(vals[0], cfg.data_dir) if vals else "")


def tag_set(cfg: DataConfig) -> readers.LabelSet:
  """The run's tag set, by the rule training uses (labels, else TFDS names, else inferred)."""
  if cfg.labels:
    return readers.LabelSet(tuple(cfg.labels))
  train_path, _ = train_files(cfg)
  if train_path:
    return infer_tags(read_conll(train_path, cfg))
  if cfg.tfds_name:
    return readers.LabelSet(tfds_tag_names(cfg))
  raise DataError("the run names no train file (DataConfig.files) nor TFDS dataset to take its "
                  "tags from; set NerConfig.labels")


# ----------------------------------------------------------------------------- alignment


@dataclasses.dataclass
class TagTable:
  input_ids: np.ndarray     # int32 [n, s]
  input_mask: np.ndarray    # int32 [n, s]
  labels: np.ndarray        # int32 [n, s]: the tag id at first sub-words, -1 elsewhere
  first: list               # per sentence: int array, the row position of each kept word's first sub-word
  num_words: np.ndarray     # int [n]: words in the sentence (kept or not)
  truncated: int = 0        # sentences with words past the row
  words: list | None = None  # the words per sentence (eval files)
  gold: list | None = None   # the tags per sentence (eval files)

  def __len__(self):
    return len(self.num_words)

  @property
  def truncated_words(self) -> int:
    return int(sum(n - len(f) for n, f in zip(self.num_words, self.first)))


def special_ids(tokenizer) -> tuple[int, int, int, int]:
  """(cls, sep, pad, unk) ids; a tokenizer without [CLS] and [SEP] is an error."""
  name = type(tokenizer).__name__
  sp = getattr(tokenizer, "sp", None)
  try:
    cls_id, sep_id = tokenizer.piece_to_id("[CLS]"), tokenizer.piece_to_id("[SEP]")
  except (AttributeError, KeyError):
    raise DataError(f"token classification needs a tokenizer with [CLS] and [SEP] pieces; "
                    f"{name} has none") from None
  unk = getattr(tokenizer, "unk_id", None)
  if sp is not None:
    unk = sp.unk_id()
    if unk in (cls_id, sep_id):
      raise DataError(f"the SentencePiece model {getattr(tokenizer, 'path', '')} has no [CLS]/[SEP] "
                      f"pieces; train it with `--special_tokens [CLS] [SEP] [MASK]`")
  pad = getattr(tokenizer, "pad_id", 0)
  return cls_id, sep_id, int(pad or 0), int(unk if unk is not None else 0)


def word_pieces(tokenizer, sentences: Sequence[Sequence[str]], unk: int) -> list[list[list[int]]]:
  """Per sentence, per word, its sub-word ids ([unk] for a word with none)."""
  if hasattr(tokenizer, "tok") and hasattr(tokenizer, "batch"):    # imported WordPiece / BPE
    encs = tokenizer.library_tokenizer(split_special_tokens=True).encode_batch(
        [list(s) for s in sentences], is_pretokenized=True, add_special_tokens=False)
    out = []
    for words, e in zip(sentences, encs):
      pieces = [[] for _ in words]
      for i, w in zip(e.ids, e.word_ids):
        if w is not None:
          pieces[w].append(i)
      out.append([p or [unk] for p in pieces])
    return out
  cache: dict[str, list[int]] = {}
  out = []
  for words in sentences:
    row = []
    for w in words:
      if w not in cache:
        cache[w] = list(tokenizers.encode_ordinary(tokenizer, w)) or [unk]
      row.append(cache[w])
    out.append(row)
  return out


def encode(tokenizer, sentences: Sequence[Sequence[str]], seq_len: int,
           tags: Sequence[np.ndarray] | None = None) -> TagTable:
  """Words per sentence (and tag ids per sentence) -> padded rows with first-sub-word labels."""
  if seq_len < 3:
    raise DataError(f"DataConfig.seq_len={seq_len}: a tagged row needs [CLS], a word and [SEP]")
  cls_id, sep_id, pad, unk = special_ids(tokenizer)
  pieces = word_pieces(tokenizer, sentences, unk)
  n = len(sentences)
  ids = np.full((n, seq_len), pad, np.int32)
  mask = np.zeros((n, seq_len), np.int32)
  labels = np.full((n, seq_len), -1, np.int32)
  firsts, truncated = [], 0
  for r, words in enumerate(pieces):
    toks, first = [cls_id], []
    for w in words:
      if len(toks) >= seq_len - 1:
        break
      first.append(len(toks))
      toks.extend(w)
    if sum(len(w) for w in words) + 2 > seq_len:
      truncated += 1
    toks = toks[:seq_len - 1] + [sep_id]
    ids[r, :len(toks)] = toks
    mask[r, :len(toks)] = 1
    first = np.asarray(first, np.int64)
    if tags is not None:
      labels[r, first] = np.asarray(tags[r])[:len(first)]
    firsts.append(first)
  return TagTable(ids, mask, labels, firsts, np.array([len(s) for s in sentences], np.int64), truncated)


# ----------------------------------------------------------------------------- batches


SHUFFLE_SALT = 0x6e6572   # this pipeline's stream of per-epoch shuffles (data.lm.epoch_rows)


def rows(table: TagTable, idx: np.ndarray, real: np.ndarray) -> dict:
  labels = table.labels[idx]
  weights = (labels >= 0) & (real[:, None] > 0)
  return {"input_ids": table.input_ids[idx], "input_mask": table.input_mask[idx],
          "segment_ids": np.zeros_like(table.input_ids[idx]),
          "labels": np.maximum(labels, 0), "label_weights": weights.astype(np.float32)}


@dataclasses.dataclass
class NerData:
  cfg: DataConfig
  tokenizer: object
  labels: readers.LabelSet
  train: TagTable
  val: TagTable
  source: str

  @classmethod
  def build(cls, cfg: DataConfig, tokenizer=None) -> "NerData":
    if tokenizer is None:
      tokenizer = tokenizers.build(cfg.tokenizer)
    train_path, val_path = train_files(cfg)
    if train_path:
      if not val_path:
        raise DataError("token classification needs an eval file: DataConfig.val_files = [%EVAL_FILE]")
      train_s, val_s = read_conll(train_path, cfg), None
      names = None
      source = train_path
    elif cfg.tfds_name:
      train_s, names = read_tfds(cfg, "train")
      source = f"TFDS {cfg.tfds_name}"
      val_s = None if val_path else read_tfds(cfg, cfg.ner_tfds_eval_split)[0]
    else:
      raise DataError("token classification needs a train file (DataConfig.files = [%TRAIN_FILE], "
                      "CoNLL columns) or a TFDS dataset (DataConfig.tfds_name, e.g. 'conll2003')")
    label_set = (readers.LabelSet(tuple(cfg.labels)) if cfg.labels else
                 readers.LabelSet(names) if names else infer_tags(train_s))
    _check_head_width(len(label_set), cfg.num_classes)
    train = encode(tokenizer, [w for w, _ in train_s], cfg.seq_len,
                   tag_ids(label_set, train_s, train_path or source, cfg.tag_column))
    # The in-training eval (loss, accuracy) runs rows of seq_len; `bigmodel evaluate` reads
    # the file again at ner_eval_seq_len for entity F1.
    if val_path:
      val_s, val_source = read_conll(val_path, cfg), val_path
    else:
      val_source = f"TFDS {cfg.tfds_name} {cfg.ner_tfds_eval_split}"
    val = encode(tokenizer, [w for w, _ in val_s], cfg.seq_len,
                 tag_ids(label_set, val_s, val_path or val_source, cfg.tag_column))
    for name, t, where in (("train", train, source), ("eval", val, val_source)):
      if t.truncated:
        log.warning("%s (%s): %d of %d sentences are longer than seq_len=%d pieces and were "
                    "truncated (%d words dropped; `bigmodel evaluate` tags dropped words O)",
                    where, name, t.truncated, len(t), cfg.seq_len, t.truncated_words)
    log.info("NER data: %d train sentences (%s), %d eval sentences (%s), %d tags %s",
             len(train), source, len(val), val_source, len(label_set), list(label_set.names))
    return cls(cfg, tokenizer, label_set, train, val, source)

  def train_rows(self, keys: np.ndarray) -> dict:
    n = len(self.train)
    idx = epoch_rows(keys, n, self.cfg.seed, SHUFFLE_SALT)
    return rows(self.train, idx, np.ones(len(keys)))

  def eval_rows(self, keys: np.ndarray) -> dict:
    n = len(self.val)
    return rows(self.val, keys % n, (keys < n).astype(np.float32))

  def _dataset(self, fn, table, global_batch, start, stop, host_rows):
    s = table.input_ids.shape[1]
    shapes = {k: (s,) for k in KEYS}
    return keyed_batches(fn, shapes, ("label_weights",), global_batch, start, stop, host_rows)

  def train_batches(self, global_batch: int, start_step: int = 0, host_rows=None) -> tf.data.Dataset:
    stop = np.iinfo(np.int64).max // (2 * global_batch)
    if self.cfg.ner_length_buckets:
      return self._bucketed(global_batch, start_step, stop, host_rows)
    return self._dataset(self.train_rows, self.train, global_batch, start_step, stop, host_rows)

  # --- length buckets: batch k of a pure function of (seed, k), cut to a bucket length

  def bucket_batch(self, k: int, global_batch: int) -> tuple[np.ndarray, int]:
    """(train row indices, row length) of global batch k with NerConfig.ner_length_buckets.

    Epoch e: the rows in permutation(seed, e) order, in windows of 50 batches sorted by
    length, cut into batches (the last one filled from the epoch's start), the batches then
    shuffled; each batch is cut to the smallest bucket that holds its longest row."""
    n = len(self.train)
    per_epoch = -(-n // global_batch)
    epoch, j = divmod(int(k), per_epoch)
    if getattr(self, "_epoch_key", None) != (epoch, global_batch):
      rng = np.random.default_rng([self.cfg.seed, epoch, 0x6e6572, 1])
      order = epoch_permutation(self.cfg.seed, epoch, n, SHUFFLE_SALT)
      order = np.concatenate([order, order[:per_epoch * global_batch - n]])
      lengths = self.train.input_mask.sum(-1)
      window = 50 * global_batch
      for w in range(0, len(order), window):
        chunk = order[w:w + window]
        order[w:w + window] = chunk[np.argsort(lengths[chunk], kind="stable")]
      batches = order.reshape(per_epoch, global_batch)[rng.permutation(per_epoch)]
      self._epoch_key, self._epoch_batches = (epoch, global_batch), batches
    idx = self._epoch_batches[j]
    longest = int(self.train.input_mask[idx].sum(-1).max())
    width = self.train.input_ids.shape[1]
    fits = [b for b in sorted(self.cfg.ner_length_buckets) if longest <= b < width]
    return idx, (fits[0] if fits else width)

  def eval_bucket_batch(self, k: int, global_batch: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(eval row indices, real-row flags, row length) of eval batch k with length buckets:
    the rows sorted by length; the last batch is padded with weight-0 rows."""
    lengths = self.val.input_mask.sum(-1)
    order = np.argsort(lengths, kind="stable")
    keys = int(k) * global_batch + np.arange(global_batch)
    idx = order[keys % len(order)]
    width = self.val.input_ids.shape[1]
    fits = [b for b in sorted(self.cfg.ner_length_buckets) if int(lengths[idx].max()) <= b < width]
    return idx, (keys < len(order)).astype(np.float32), (fits[0] if fits else width)

  def _bucketed(self, global_batch, start, stop, host_rows, train=True):
    first, count = host_rows or (0, global_batch)
    dtypes = [tf.float32 if k == "label_weights" else tf.int32 for k in KEYS]

    def np_batch(step):
      if train:
        idx, width = self.bucket_batch(int(step), global_batch)
        table, real = self.train, np.ones(global_batch)
      else:
        idx, real, width = self.eval_bucket_batch(int(step), global_batch)
        table = self.val
      sl = slice(first, first + count)
      b = rows(table, idx[sl], real[sl])
      return [b[k][:, :width] for k in KEYS]

    def make(step):
      outs = tf.numpy_function(np_batch, [step], dtypes, stateful=False)
      return {k: tf.ensure_shape(o, (count, None)) for k, o in zip(KEYS, outs)}

    ds = tf.data.Dataset.range(start, stop).map(make, num_parallel_calls=1, deterministic=True)
    return ds.prefetch(2)

  def eval_batches(self, global_batch: int, host_rows=None) -> tf.data.Dataset:
    """Every eval sentence (DataConfig.eval_batches does not cut NER evals short)."""
    steps = -(-len(self.val) // global_batch)
    if self.cfg.ner_length_buckets:
      return self._bucketed(global_batch, 0, steps, host_rows, train=False)
    return self._dataset(self.eval_rows, self.val, global_batch, 0, steps, host_rows)


def _check_head_width(num_tags: int, width: int) -> None:
  """The tagger's width (NerConfig.num_classes, NUM_TAGS; 0: not set) must cover the tags."""
  if not width:
    return
  if width < num_tags:
    raise DataError(f"the data has {num_tags} tags but NerConfig.num_classes={width}: set "
                    f"NUM_TAGS (NerConfig.num_classes) to {num_tags}")
  if width > num_tags:
    log.warning("NerConfig.num_classes=%d is larger than the %d tags: %d head outputs stay unused",
                width, num_tags, width - num_tags)


def load_eval(cfg: DataConfig, tokenizer, label_set: readers.LabelSet, path: str
              ) -> TagTable:
  """An eval CoNLL file, encoded at the eval row length; its tags checked against the set."""
  sentences = read_conll(path, cfg)
  table = encode(tokenizer, [w for w, _ in sentences], cfg.ner_eval_seq_len or cfg.seq_len,
                 tag_ids(label_set, sentences, path, cfg.tag_column))
  table.gold = [t for _, t in sentences]
  table.words = [w for w, _ in sentences]
  return table
