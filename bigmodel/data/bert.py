"""BERT pretraining input, as google-research/bert's `create_pretraining_data.py` builds it.

documents -> sentences -> token ids -> `[CLS] A [SEP] B [SEP]` pairs -> masked LM rows.

Documents come from any text source of the foundation pipeline (`sources.lm_documents`,
split by `DataConfig.documents`: WikiText `heading`s, `blank_line`s, ...). Section
headings (`= = History = =`) are dropped and each paragraph is split into sentences
after `.`, `!` or `?` (not after initials such as `U.S.`). The `<unk>` marks of tokenized
corpora (WikiText's tokenized splits) are dropped (see `drop_unk_marks`).

Pairs (`create_instances_from_document`): for each document, sentences accumulate into
a chunk until it reaches a target length (`seq_len - 3`, or with probability
`short_seq_prob`, once per document per pass, a random length in [2, seq_len - 3]); A is
the first 1..n-1 sentences of the chunk. Half of the time B is the rest of the chunk
(label 0, "is next"); otherwise (label 1, "random next") B is read from a random
sentence of a *different* random document, and the unused sentences go back to the
document. The pair is then truncated to `seq_len - 3` tokens by removing tokens one at a
time from the front or the back (at random) of the longer side. `dupe_factor` passes
over the documents give different pairs.

Masking (`create_masked_lm_predictions`): num_to_predict = min(max_predictions,
max(1, round(len(tokens) * 0.15))) of the non-special positions ([CLS], [SEP] and [PAD]
are never candidates), chosen uniformly (or whole words: every piece of a word together,
a word never split, as `do_whole_word_mask`); of those 80% become [MASK], 10% a random
token, 10% stay. `len(tokens)` counts [CLS] and [SEP], as the original does. Random
tokens are drawn from the ordinary pieces (not special or control symbols; the original
draws from the whole vocabulary). Positions, label ids and weights (1, then 0 padding)
are gathered into fixed-width arrays, as the original's tf.Examples.

  static    (default, the original) each pass's pairs are masked once, at build time
  dynamic   (RoBERTa) the masks are redrawn every time a row is visited

Batches are a pure function of (seed, step), as in `data/lm.py`: global example k of
epoch k // n is row `permutation(seed, epoch)[k % n]` of the table, and dynamic masks
are seeded by (seed, k). Resuming from a step is exact. Validation pairs (the same
`dupe_factor` passes over the held-out documents) are masked once (static), so every
evaluation sees the same rows.

Tokenizer: SentencePiece with [CLS], [SEP] and [MASK] reserved (pad <pad>/[PAD] and unk
<unk>/[UNK] are SentencePiece's own), or an imported WordPiece vocabulary. With
`DataConfig.tokenizer = 'spm:8000'` a unigram model of that size is trained on the
training documents and cached (by content hash) under $BIGMODEL_CACHE_DIR or
~/.cache/bigmodel; the run saves it into its workdir.

Batch (numpy, this host's rows; s = seq_len, p = prediction slots):
  input_ids int32 [b, s]       masked tokens, [PAD]-padded
  input_mask int32 [b, s]      1 real, 0 padding
  segment_ids int32 [b, s]     0 for [CLS] A [SEP], 1 for B [SEP]
  masked_lm_positions int32 [b, p], masked_lm_ids int32 [b, p], masked_lm_weights float32 [b, p]
  next_sentence_labels int32 [b]    0 B follows A, 1 B is random
  next_sentence_weights float32 [b] 1, or 0 for the padding rows of a last eval batch
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import re
import tempfile
from typing import Sequence

import numpy as np
from bigmodel.data import lazy_tf as tf  # imported at first use: see bigmodel/data/__init__.py

from bigmodel.config import DataConfig
from bigmodel.data import sources, tokenizers
from bigmodel.data.lm import epoch_rows, keyed_batches
from bigmodel.data.sources import DataError

log = logging.getLogger(__name__)

SPECIAL_PIECES = ("[CLS]", "[SEP]", "[MASK]")
KEYS = ("input_ids", "input_mask", "segment_ids", "masked_lm_positions", "masked_lm_ids",
        "masked_lm_weights", "next_sentence_labels", "next_sentence_weights")
MASKINGS = ("static", "dynamic")


def prediction_slots(seq_len: int, probability: float = 0.15) -> int:
  """Default `max_predictions_per_seq`: the masked share of seq_len rounded up to a multiple
  of 4 (BERT's 20 at 128 and 80 at 512)."""
  return max(4, 4 * math.ceil(math.ceil(seq_len * probability - 1e-9) / 4))


# ----------------------------------------------------------------------------- text


_HEADING_LINE = re.compile(r"^\s*=( =)* .* (= )*=\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_ABBREVIATION = re.compile(r"(?:^|\s)(?:[A-Z]\.)+$|(?:^|\s)(?:Mr|Mrs|Ms|Dr|St|Jr|Sr|No|vs|Lt|Gen|Col|Capt|Sgt|Prof|Rev)\.$")


def split_sentences(document: str) -> list[str]:
  """Paragraph lines -> sentences; heading lines (`= = Title = =`) are dropped."""
  out = []
  for line in document.split("\n"):
    line = line.strip()
    if not line or _HEADING_LINE.match(line):
      continue
    start = 0
    for m in _SENTENCE_END.finditer(line):
      if _ABBREVIATION.search(line[start:m.start()]):
        continue
      out.append(line[start:m.start()])
      start = m.end()
    out.append(line[start:])
  return [s for s in (s.strip() for s in out) if s]


UNK_MARK = re.compile(r"\s*<unk>")   # how tokenized corpora (WikiText, PTB) mark a rare word


def drop_unk_marks(sentence: str) -> str:
  """Removes the `<unk>` marks of a tokenized corpus. Kept as [UNK], their rate (which differs
  between corpora: WikiText's tokenized split vs its raw one) told next-sentence prediction
  which corpus each segment came from, a shortcut that does not carry to held-out text."""
  return UNK_MARK.sub("", sentence).strip()


# ----------------------------------------------------------------------------- vocabulary


@dataclasses.dataclass(frozen=True)
class BertVocab:
  """Special ids and per-id tables of a tokenizer, for pairs and masking."""
  size: int
  pad: int
  unk: int
  cls: int
  sep: int
  mask: int
  special: np.ndarray      # bool [size]: never a masking candidate nor a random replacement
  random_ids: np.ndarray   # int32: the ordinary pieces a random replacement draws from
  word_start: np.ndarray   # bool [size]: the piece begins a word (whole-word masking)

  @classmethod
  def from_tokenizer(cls, tok) -> "BertVocab":
    size = int(tok.vocab_size)
    sp = getattr(tok, "sp", None)
    if sp is not None:                                   # SentencePiece
      pieces = [sp.id_to_piece(i) for i in range(size)]
      control = np.array([sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)
                          for i in range(size)])
      unk = sp.unk_id()
      word_start = np.array([p.startswith("\u2581") for p in pieces])
    elif hasattr(tok, "id_to_piece"):                    # WordPiece (bigmodel.data.hf_tokenizers)
      pieces = [tok.id_to_piece(i) or "" for i in range(size)]
      control = np.zeros(size, bool)
      unk = tok.unk_id
      word_start = np.array([not p.startswith("##") for p in pieces])
    else:
      raise DataError(f"BERT pretraining needs a SentencePiece or WordPiece tokenizer with "
                      f"[CLS], [SEP] and [MASK]; got {type(tok).__name__}. Set "
                      f"DataConfig.tokenizer = 'spm:8000' to train one on the data.")
    index = {p: i for i, p in enumerate(pieces)}
    missing = [p for p in SPECIAL_PIECES if p not in index]
    if missing:
      raise DataError(f"the tokenizer has no {missing}: BERT pretraining needs [CLS], [SEP] and "
                      f"[MASK] reserved. Train one with `bigmodel tokenizer train --special_tokens "
                      f"[CLS] [SEP] [MASK] ...`, or set DataConfig.tokenizer = 'spm:8000'.")
    pad = index.get("[PAD]", sp.pad_id() if sp is not None else getattr(tok, "pad_id", None))
    if pad is None or pad < 0:
      raise DataError("the tokenizer has no padding id ([PAD] or SentencePiece pad_id)")
    ids = dict(pad=pad, unk=unk if unk is not None and unk >= 0 else pad,
               cls=index["[CLS]"], sep=index["[SEP]"], mask=index["[MASK]"])
    bracketed = np.array([p.startswith("[") and p.endswith("]") and len(p) > 2 for p in pieces])
    special = control | bracketed
    special[[ids["pad"], ids["cls"], ids["sep"], ids["mask"]]] = True
    random_ids = np.flatnonzero(~special & (np.arange(size) != ids["unk"])).astype(np.int32)
    if random_ids.size == 0:
      raise DataError("the tokenizer has no ordinary pieces to draw random replacements from")
    return cls(size=size, special=special, random_ids=random_ids, word_start=word_start, **ids)


def _cache_dir() -> str:
  return os.environ.get("BIGMODEL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                              "bigmodel")


def train_tokenizer(sentences: Sequence[str], vocab_size: int):
  """A unigram SentencePiece model with [CLS] [SEP] [MASK] reserved, trained on `sentences`
  (one a line) and cached by content hash."""
  text = "\n".join(sentences) + "\n"
  key = hashlib.sha256(f"bert-spm-v2 {vocab_size} {SPECIAL_PIECES}\n".encode() + text.encode()).hexdigest()[:16]
  directory = _cache_dir()
  path = os.path.join(directory, f"bert-spm-{vocab_size}-{key}.model")
  if not os.path.exists(path):
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
      corpus = os.path.join(tmp, "sentences.txt")
      with open(corpus, "w", encoding="utf-8") as f:
        f.write(text)
      log.info("training a %d-piece SentencePiece model on %d sentences", vocab_size, len(sentences))
      try:
        model = tokenizers.train_sentencepiece([corpus], vocab_size, "unigram", os.path.join(tmp, "spm"),
                                               special_tokens=SPECIAL_PIECES, character_coverage=1.0)
      except RuntimeError as e:
        raise DataError(f"could not train a {vocab_size}-piece SentencePiece model on the "
                        f"training text ({e}); choose a size that fits the text in DataConfig.tokenizer = "
                        f"'spm:N'") from None
      os.replace(model, path)
  return tokenizers.SentencePieceTokenizer(path)


def build_tokenizer(spec: str, sentences: Sequence[str]):
  """`spm:N` (train and cache on `sentences`), or what `tokenizers.build` reads (a path)."""
  m = re.fullmatch(r"spm:(\d+)", spec)
  if m:
    return train_tokenizer(sentences, int(m.group(1)))
  if spec in ("char", "byte"):
    raise DataError(f"DataConfig.tokenizer={spec!r} has no [CLS]/[SEP]/[MASK]: BERT pretraining "
                    f"needs DataConfig.tokenizer = 'spm:8000' (train one on the data), or the "
                    f"path of a SentencePiece model or WordPiece directory that has them")
  return tokenizers.build(spec)


# ----------------------------------------------------------------------------- pairs


@dataclasses.dataclass
class Pair:
  tokens_a: np.ndarray
  tokens_b: np.ndarray
  is_random_next: bool
  doc_a: int
  doc_b: int


def truncate_seq_pair(a: np.ndarray, b: np.ndarray, max_num_tokens: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """Removes one token at a time from the front or back (at random) of the longer side."""
  a_lo, a_hi, b_lo, b_hi = 0, len(a), 0, len(b)
  while (a_hi - a_lo) + (b_hi - b_lo) > max_num_tokens:
    take_a = (a_hi - a_lo) > (b_hi - b_lo)
    front = rng.random() < 0.5
    if take_a:
      a_lo, a_hi = (a_lo + 1, a_hi) if front else (a_lo, a_hi - 1)
    else:
      b_lo, b_hi = (b_lo + 1, b_hi) if front else (b_lo, b_hi - 1)
  return a[a_lo:a_hi], b[b_lo:b_hi]


def create_pairs_from_document(documents: Sequence[Sequence[np.ndarray]], document_index: int,
                               max_seq_length: int, short_seq_prob: float,
                               rng: np.random.Generator) -> list[Pair]:
  """google-research/bert `create_instances_from_document`, before masking.

  documents: per document, its sentences as int arrays (all non-empty); at least 2 documents.
  """
  document = documents[document_index]
  max_num_tokens = max_seq_length - 3
  target_seq_length = max_num_tokens
  if rng.random() < short_seq_prob:
    target_seq_length = int(rng.integers(2, max_num_tokens + 1))
  pairs = []
  chunk: list[np.ndarray] = []
  length = 0
  i = 0
  while i < len(document):
    chunk.append(document[i])
    length += len(document[i])
    if i == len(document) - 1 or length >= target_seq_length:
      if chunk:
        a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
        tokens_a = np.concatenate(chunk[:a_end])
        if len(chunk) == 1 or rng.random() < 0.5:
          is_random_next = True
          target_b_length = target_seq_length - len(tokens_a)
          # A random *other* document (the original retries 10 times and may give up).
          doc_b = int(rng.integers(0, len(documents) - 1))
          doc_b += doc_b >= document_index
          random_document = documents[doc_b]
          start = int(rng.integers(0, len(random_document)))
          b_parts, b_len = [], 0
          for j in range(start, len(random_document)):
            b_parts.append(random_document[j])
            b_len += len(random_document[j])
            if b_len >= target_b_length:
              break
          tokens_b = np.concatenate(b_parts)
          i -= len(chunk) - a_end          # put the unused sentences back
        else:
          is_random_next = False
          doc_b = document_index
          tokens_b = np.concatenate(chunk[a_end:])
        tokens_a, tokens_b = truncate_seq_pair(tokens_a, tokens_b, max_num_tokens, rng)
        assert len(tokens_a) >= 1 and len(tokens_b) >= 1
        pairs.append(Pair(tokens_a, tokens_b, is_random_next, document_index, doc_b))
      chunk = []
      length = 0
    i += 1
  return pairs


@dataclasses.dataclass
class Table:
  """Right-padded `[CLS] A [SEP] B [SEP]` rows (masked already when static)."""
  tokens: np.ndarray          # int32 [n, s]
  lengths: np.ndarray         # int32 [n]
  len_a: np.ndarray           # int32 [n]: tokens of A (without specials)
  is_random_next: np.ndarray  # int32 [n]
  doc_a: np.ndarray           # int32 [n]
  doc_b: np.ndarray           # int32 [n]
  positions: np.ndarray | None = None   # int32 [n, p] (static masks)
  labels: np.ndarray | None = None      # int32 [n, p]
  counts: np.ndarray | None = None      # int32 [n]: masked positions in use

  def __len__(self):
    return len(self.lengths)


def build_table(documents: Sequence[Sequence[np.ndarray]], vocab: BertVocab, seq_len: int,
                short_seq_prob: float, dupe_factor: int, seed: int) -> Table:
  """`dupe_factor` passes of pairs over all documents, unmasked."""
  if len(documents) < 2:
    raise DataError(f"next-sentence pairs need at least 2 documents (a random B comes from "
                    f"another document); got {len(documents)}. Check DataConfig.documents.")
  pairs: list[Pair] = []
  for dupe in range(dupe_factor):
    rng = np.random.default_rng([seed, dupe, 0x7061697273])
    for d in range(len(documents)):
      pairs.extend(create_pairs_from_document(documents, d, seq_len, short_seq_prob, rng))
  n = len(pairs)
  tokens = np.full((n, seq_len), vocab.pad, np.int32)
  lengths = np.zeros(n, np.int32)
  len_a = np.zeros(n, np.int32)
  for r, p in enumerate(pairs):
    row = np.concatenate([[vocab.cls], p.tokens_a, [vocab.sep], p.tokens_b, [vocab.sep]])
    tokens[r, :len(row)] = row
    lengths[r], len_a[r] = len(row), len(p.tokens_a)
  return Table(tokens, lengths, len_a,
               np.array([p.is_random_next for p in pairs], np.int32),
               np.array([p.doc_a for p in pairs], np.int32),
               np.array([p.doc_b for p in pairs], np.int32))


# ----------------------------------------------------------------------------- masking


def mask_row(tokens: np.ndarray, vocab: BertVocab, rng: np.random.Generator, *,
             probability: float = 0.15, max_predictions: int = 20,
             whole_word: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """google-research/bert `create_masked_lm_predictions` on one unpadded row.

  Returns (masked tokens, sorted masked positions, their original ids).
  """
  n = len(tokens)
  cand = np.flatnonzero(~vocab.special[tokens])
  num_to_predict = min(max_predictions, max(1, int(round(n * probability))))
  if not whole_word:
    chosen = cand[rng.permutation(len(cand))[:num_to_predict]]
  else:
    # words: a word-start piece and the continuation pieces right after it
    new_word = vocab.word_start[tokens[cand]] | np.r_[True, np.diff(cand) > 1]
    groups = np.split(cand, np.flatnonzero(new_word)[1:])
    picked, count = [], 0
    for g in (groups[i] for i in rng.permutation(len(groups))):
      if count >= num_to_predict:
        break
      if count + len(g) > num_to_predict:
        continue
      picked.append(g)
      count += len(g)
    chosen = np.concatenate(picked) if picked else np.zeros(0, np.int64)
  chosen = np.sort(chosen)
  k = len(chosen)
  labels = tokens[chosen]
  r_mask, r_keep = rng.random(k), rng.random(k)
  random_tok = vocab.random_ids[rng.integers(0, len(vocab.random_ids), k)]
  out = tokens.copy()
  out[chosen] = np.where(r_mask < 0.8, vocab.mask, np.where(r_keep < 0.5, labels, random_tok))
  return out, chosen.astype(np.int32), labels.astype(np.int32)


def mask_table(table: Table, vocab: BertVocab, rng: np.random.Generator, *, probability: float,
               slots: int, max_predictions: int, whole_word: bool) -> Table:
  """Static masking: every row masked once."""
  n = len(table)
  tokens = table.tokens.copy()
  positions = np.zeros((n, slots), np.int32)
  labels = np.zeros((n, slots), np.int32)
  counts = np.zeros(n, np.int32)
  for r in range(n):
    length = table.lengths[r]
    out, pos, lab = mask_row(table.tokens[r, :length], vocab, rng, probability=probability,
                             max_predictions=max_predictions, whole_word=whole_word)
    tokens[r, :length] = out
    positions[r, :len(pos)], labels[r, :len(pos)], counts[r] = pos, lab, len(pos)
  return dataclasses.replace(table, tokens=tokens, positions=positions, labels=labels, counts=counts)


# ----------------------------------------------------------------------------- batches


SHUFFLE_SALT = 0x73687566   # this pipeline's stream of per-epoch shuffles (data.lm.epoch_rows)


@dataclasses.dataclass
class BertData:
  """Train and validation pair tables and their tokenizer, for one run."""
  cfg: DataConfig
  tokenizer: object
  vocab: BertVocab
  train: Table
  val: Table
  source: str
  baselines: dict

  @property
  def slots(self) -> int:
    """max_predictions_per_seq: the cap on masked positions and the width of their arrays."""
    return self.cfg.mlm_max_predictions or prediction_slots(self.cfg.seq_len, self.cfg.mlm_probability)

  @classmethod
  def build(cls, cfg: DataConfig, tokenizer=None) -> "BertData":
    _check(cfg)
    train_docs, val_docs, source = sources.lm_documents(cfg)
    train_docs = [s for s in map(_sentences, train_docs) if s]
    if val_docs is None:
      n_val = max(2, int(round(len(train_docs) * cfg.val_fraction)))
      if len(train_docs) - n_val < 2:
        raise DataError(f"{source} has {len(train_docs)} documents: too few to hold out {n_val} for "
                        f"validation and keep 2 for training. Add data, set DataConfig.val_files, "
                        f"or check DataConfig.documents={cfg.documents!r}")
      train_docs, val_docs = train_docs[:-n_val], train_docs[-n_val:]
    else:
      val_docs = [s for s in map(_sentences, val_docs) if s]
    if tokenizer is None:
      tokenizer = build_tokenizer(cfg.tokenizer, [s for d in train_docs for s in d])
    vocab = BertVocab.from_tokenizer(tokenizer)

    def encode(docs):
      out = []
      for doc in docs:
        ids = [a for a in (tokenizers.encode_ordinary(tokenizer, s) for s in doc) if len(a)]
        if ids:
          out.append(ids)
      return out
    train_ids, val_ids = encode(train_docs), encode(val_docs)
    train = build_table(train_ids, vocab, cfg.seq_len, cfg.short_seq_prob, cfg.dupe_factor, cfg.seed)
    # validation: the same passes (pairs and masks) over held-out documents; `eval_batches`
    # caps how many rows an evaluation reads
    val = build_table(val_ids, vocab, cfg.seq_len, cfg.short_seq_prob, cfg.dupe_factor,
                      cfg.seed + 7919)
    data = cls(cfg, tokenizer, vocab, train, val, source, {})
    if cfg.mlm_masking == "static":
      data.train = data._mask(train, np.random.default_rng([cfg.seed, 0x737461]))
    data.val = data._mask(val, np.random.default_rng([cfg.seed, 0x76616c]))
    data.baselines = data._baselines(train_ids)
    n_tok = sum(len(s) for d in train_ids for s in d)
    log.info("BERT data: %s; %d train documents (%d tokens) -> %d pairs over %d passes (%s masking); "
             "%d validation documents -> %d pairs; vocab %d", source, len(train_ids), n_tok,
             len(train), cfg.dupe_factor, cfg.mlm_masking, len(val_ids), len(val), vocab.size)
    b = data.baselines
    log.info("baselines on all %d validation pairs: the most frequent training token %r at every "
             "masked position -> mlm_accuracy %.4f; the majority NSP label -> nsp_accuracy %.4f "
             "(%.1f%% random next); an evaluation reads min(eval_batches x batch, %d) pairs",
             len(val), b["most_frequent_token"], b["mlm_accuracy"], b["nsp_accuracy"],
             100 * b["random_next_fraction"], len(val))
    return data

  def _mask(self, table: Table, rng) -> Table:
    cfg = self.cfg
    return mask_table(table, self.vocab, rng, probability=cfg.mlm_probability, slots=self.slots,
                      max_predictions=self.slots, whole_word=cfg.mlm_whole_word)

  def _baselines(self, train_ids) -> dict:
    """Accuracy of always predicting the most frequent training token at the masked
    positions of validation, and of always predicting the majority NSP label."""
    counts = np.bincount(np.concatenate([s for d in train_ids for s in d]), minlength=self.vocab.size)
    counts[self.vocab.special] = 0
    top = int(np.argmax(counts))
    val = self.val
    used = np.arange(val.labels.shape[1])[None, :] < val.counts[:, None]
    random_next = float(val.is_random_next.mean())
    piece = (self.tokenizer.sp.id_to_piece(top) if hasattr(self.tokenizer, "sp")
             else self.tokenizer.decode([top]))
    return {"most_frequent_token": piece, "most_frequent_id": top,
            "mlm_accuracy": float((val.labels[used] == top).mean()),
            "nsp_accuracy": max(random_next, 1 - random_next), "random_next_fraction": random_next}

  # -- rows and batches

  def rows(self, table: Table, idx: np.ndarray, keys: np.ndarray | None = None) -> dict:
    """The batch dict of table rows `idx`; with `keys` (global example indices), masks are
    drawn now (dynamic), each row from its own (seed, key) generator."""
    cfg, s, p = self.cfg, self.cfg.seq_len, self.slots
    lengths, len_a = table.lengths[idx], table.len_a[idx]
    ar = np.arange(s)[None, :]
    input_mask = ar < lengths[:, None]
    segment_ids = (ar >= len_a[:, None] + 2) & input_mask
    if keys is None:
      tokens, positions, labels = table.tokens[idx], table.positions[idx], table.labels[idx]
      weights = (np.arange(p)[None, :] < table.counts[idx][:, None]).astype(np.float32)
    else:
      tokens = table.tokens[idx].copy()
      positions = np.zeros((len(idx), p), np.int32)
      labels = np.zeros((len(idx), p), np.int32)
      weights = np.zeros((len(idx), p), np.float32)
      for r, (row, key) in enumerate(zip(idx, keys)):
        rng = np.random.default_rng([cfg.seed, 0x64796e, int(key)])
        length = table.lengths[row]
        out, pos, lab = mask_row(table.tokens[row, :length], self.vocab, rng,
                                 probability=cfg.mlm_probability, max_predictions=self.slots,
                                 whole_word=cfg.mlm_whole_word)
        tokens[r, :length] = out
        positions[r, :len(pos)], labels[r, :len(pos)], weights[r, :len(pos)] = pos, lab, 1.0
    return {"input_ids": tokens.astype(np.int32), "input_mask": input_mask.astype(np.int32),
            "segment_ids": segment_ids.astype(np.int32),
            "masked_lm_positions": positions.astype(np.int32), "masked_lm_ids": labels.astype(np.int32),
            "masked_lm_weights": weights,
            "next_sentence_labels": table.is_random_next[idx].astype(np.int32),
            "next_sentence_weights": np.ones(len(idx), np.float32)}

  def train_rows(self, keys: np.ndarray) -> dict:
    """Global example indices -> rows: per-epoch permutations of the table."""
    n = len(self.train)
    idx = epoch_rows(keys, n, self.cfg.seed, SHUFFLE_SALT)
    return self.rows(self.train, idx, keys if self.cfg.mlm_masking == "dynamic" else None)

  def eval_rows(self, keys: np.ndarray) -> dict:
    """Validation rows in order; past the end, zero-weight copies (a partial last batch)."""
    n = len(self.val)
    batch = self.rows(self.val, keys % n)
    real = (keys < n).astype(np.float32)
    batch["masked_lm_weights"] = batch["masked_lm_weights"] * real[:, None]
    batch["next_sentence_weights"] = real
    return batch

  def _dataset(self, fn, global_batch: int, start: int, stop: int,
               host_rows: tuple[int, int] | None) -> tf.data.Dataset:
    s, p = self.cfg.seq_len, self.slots
    shapes = {"input_ids": (s,), "input_mask": (s,), "segment_ids": (s,),
              "masked_lm_positions": (p,), "masked_lm_ids": (p,), "masked_lm_weights": (p,),
              "next_sentence_labels": (), "next_sentence_weights": ()}
    assert tuple(shapes) == KEYS
    return keyed_batches(fn, shapes, ("masked_lm_weights", "next_sentence_weights"),
                         global_batch, start, stop, host_rows)

  def train_batches(self, global_batch: int, start_step: int = 0,
                    host_rows: tuple[int, int] | None = None) -> tf.data.Dataset:
    if global_batch > len(self.train):
      raise DataError(f"the training data makes {len(self.train)} pairs, fewer than one batch of "
                      f"{global_batch}; add data, raise MlmConfig.dupe_factor, or lower BATCH_SIZE")
    stop = np.iinfo(np.int64).max // (2 * global_batch)
    return self._dataset(self.train_rows, global_batch, start_step, stop, host_rows)

  def eval_batches(self, global_batch: int, host_rows: tuple[int, int] | None = None) -> tf.data.Dataset:
    steps = max(1, min(self.cfg.eval_batches, -(-len(self.val) // global_batch)))
    return self._dataset(self.eval_rows, global_batch, 0, steps, host_rows)


def _sentences(document: str) -> list[str]:
  return [s for s in map(drop_unk_marks, split_sentences(document)) if s]


def _check(cfg: DataConfig) -> None:
  if cfg.seq_len < 8:
    raise DataError(f"DataConfig.seq_len={cfg.seq_len}: BERT pairs need at least 8 "
                    f"([CLS] A [SEP] B [SEP] with room for both sentences)")
  if cfg.mlm_masking not in MASKINGS:
    raise DataError(f"MlmConfig.mlm_masking={cfg.mlm_masking!r}: expected one of {MASKINGS}")
  if not 0 < cfg.mlm_probability < 1:
    raise DataError(f"MlmConfig.mlm_probability={cfg.mlm_probability}: expected 0 < p < 1")
  if not 0 <= cfg.short_seq_prob <= 1:
    raise DataError(f"MlmConfig.short_seq_prob={cfg.short_seq_prob}: expected 0 <= p <= 1")
  if cfg.dupe_factor < 1:
    raise DataError(f"MlmConfig.dupe_factor={cfg.dupe_factor}: expected >= 1")
  if cfg.mlm_max_predictions < 0 or cfg.mlm_max_predictions > cfg.seq_len:
    raise DataError(f"MlmConfig.mlm_max_predictions={cfg.mlm_max_predictions}: expected 0 (auto) "
                    f"to seq_len={cfg.seq_len}")
