"""Extractive QA input (SQuAD v1.1 style): questions over contexts -> `[CLS] q [SEP] window [SEP]`
features with start/end token labels, as google-research/bert's run_squad.py.

Sources (objective `qa`; bigmodel/objectives/qa.py):
  DataConfig.files[0]        the train file, SQuAD v1.1 JSON (`readers.read_squad`); relative
                             paths that do not exist here are read under DataConfig.data_dir
  DataConfig.val_files[0]    the eval file; empty: the train file again (with eval_articles)
  DataConfig.tfds_name       when no file is given: a TFDS SQuAD-like dataset (`squad`,
                             `squad/v1.1`, `xquad/en`), splits QaConfig.tfds_train_split /
                             tfds_eval_split (xquad/en has only `test`)
  QaConfig.train_articles  an article range 'START:END' (Python slice, END exclusive; '' all)
  QaConfig.eval_articles   of the train / eval source, so one file can serve both sides
                             (XQuAD: '0:40' and '40:48'). Articles are runs of questions with
                             the same title, in source order.

Features (per window of a question's context):
  DataConfig.seq_len         the row length; QaConfig.max_query_len truncates the question
  QaConfig.doc_stride      contexts longer than seq_len - question - 3 tokens are cut into
                             windows whose starts are doc_stride tokens apart (BERT's sliding
                             window); a context token scores only in the window where it has
                             the most context on both sides (BERT's `_check_is_max_context`)

Training labels: the token start/end of the first gold answer when the window contains the whole
answer, else both point at [CLS] (index 0), as in run_squad. A question whose answer_start does
not match its answer text is skipped for training with one warning and a count (the Hugging
Face/BERT reference scripts do the same); eval keeps it (scoring uses only the answer texts).

Tokenizers: character offsets into the original context come from the tokenizer.
  - the imported WordPiece / byte-level BPE (`hf_tokenizers`): the `tokenizers` library's
    encodings carry offsets; [CLS] and [SEP] must be in the vocabulary (BERT-style: WordPiece)
  - a SentencePiece model (`tokenizers.SentencePieceTokenizer`): offsets from its proto output
    (bytes, converted to characters); the model must have [CLS] and [SEP] pieces (train it
    with `bigmodel tokenizer train ... --special_tokens [CLS] [SEP] [MASK]`)
  - char / byte tokenizers: a DataError (no [CLS]/[SEP])

Batch (numpy, this host's rows): input_ids, input_mask, segment_ids int32 [b, s];
start_positions, end_positions int32 [b]; weights float32 [b] (0 for padding rows).
Batches are a pure function of (seed, step), as in `data/finetune.py`.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from bigmodel.config import DataConfig
from bigmodel.data import readers, sources, tokenizers
from bigmodel.data.lm import KeyedTable
from bigmodel.data.sources import DataError

log = logging.getLogger(__name__)

KEYS = ("input_ids", "input_mask", "segment_ids", "start_positions", "end_positions", "weights")


# ----------------------------------------------------------------------------- examples


def read_file(path: str) -> list[dict]:
  """SQuAD v1.1 JSON -> records (readers.read_squad) with an `article` index."""
  try:
    records = readers.read_squad(path)
  except (ValueError, TypeError) as e:
    if isinstance(e, DataError):
      raise
    raise DataError(f"{path}: not SQuAD v1.1 JSON ({e})") from None
  return _number_articles(records)


def read_tfds(name: str, split: str, data_dir: str = "") -> list[dict]:
  """A TFDS SQuAD-like split (features id, title, context, question, answers{text,
  answer_start}) -> records as `read_file` returns them."""
  name = "squad/v1.1" if name == "squad" else name
  out = []
  for ex in sources.tfds_examples(name, split, data_dir,
                                  "point TRAIN_FILE / EVAL_FILE at SQuAD v1.1 JSON files instead"):
    missing = [k for k in ("id", "context", "question", "answers") if k not in ex]
    if missing:
      raise DataError(f"TFDS {name!r} is not SQuAD-like: no field(s) {missing}; fields: {sorted(ex)}")
    dec = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
    answers = ex["answers"]
    out.append({"id": dec(ex["id"]), "title": dec(ex.get("title", b"")),
                "context": dec(ex["context"]), "question": dec(ex["question"]),
                "answers": [dec(t) for t in answers["text"]],
                "answer_starts": [int(s) for s in answers["answer_start"]]})
  if not out:
    raise DataError(f"TFDS {name!r} split {split!r} has no questions")
  return _number_articles(out)


def _number_articles(records: list[dict]) -> list[dict]:
  article, prev = -1, object()
  for r in records:
    if r["title"] != prev:
      article, prev = article + 1, r["title"]
    r["article"] = article
  return records


def parse_range(spec: str, n: int, what: str) -> range:
  """'START:END' (either side may be empty) -> a range of article indices within [0, n)."""
  spec = (spec or "").strip()
  if not spec:
    return range(n)
  parts = spec.split(":")
  try:
    if len(parts) != 2:
      raise ValueError
    start = int(parts[0]) if parts[0].strip() else 0
    end = int(parts[1]) if parts[1].strip() else n
  except ValueError:
    raise DataError(f"{what}={spec!r}: expected an article range 'START:END' such as '0:40'") from None
  if not 0 <= start < end <= n:
    raise DataError(f"{what}={spec!r} is outside the {n} articles of the source (valid: 0 <= START "
                    f"< END <= {n})")
  return range(start, end)


def select_articles(records: list[dict], spec: str, what: str, source: str) -> list[dict]:
  n = records[-1]["article"] + 1 if records else 0
  try:
    keep = parse_range(spec, n, what)
  except DataError as e:
    raise DataError(f"{source}: {e}") from None
  return [r for r in records if r["article"] in keep]


def check_answers(records: list[dict], source: str) -> tuple[list[dict], int]:
  """(records whose first answer is at its answer_start, with `answer` = (char start, end);
  the number skipped). Questions without an answer or with a mismatching offset are skipped."""
  kept, bad, none = [], [], 0
  for r in records:
    if not r["answers"]:
      none += 1
      continue
    text, start = r["answers"][0], r["answer_starts"][0]
    if start < 0 or r["context"][start:start + len(text)] != text or not text.strip():
      bad.append(r["id"])
      continue
    kept.append({**r, "answer": (start, start + len(text))})
  if bad:
    log.warning("%s: %d question(s) whose answer_start does not match the answer text were "
                "skipped for training (first: %s)", source, len(bad), bad[:3])
  if none:
    log.warning("%s: %d question(s) without an answer were skipped for training", source, none)
  return kept, len(bad) + none


# ----------------------------------------------------------------------------- tokenization


def special_ids(tokenizer) -> tuple[int, int, int]:
  """(cls, sep, pad) ids; a DataError for tokenizers without [CLS]/[SEP]."""
  unk = getattr(tokenizer, "unk_id", None)
  if callable(unk):
    unk = unk()
  try:
    ids = [tokenizer.piece_to_id(p) for p in ("[CLS]", "[SEP]")]
  except (AttributeError, KeyError):
    ids = None
  if isinstance(tokenizer, tokenizers.SentencePieceTokenizer):
    unk = tokenizer.sp.unk_id()
  if ids is None or any(i is None or i == unk for i in ids):
    raise DataError(f"extractive QA needs a tokenizer with [CLS] and [SEP] pieces and character "
                    f"offsets (an imported WordPiece, or a SentencePiece model trained with "
                    f"--special_tokens [CLS] [SEP]); {type(tokenizer).__name__} has none")
  pad = getattr(tokenizer, "pad_id", 0)
  return ids[0], ids[1], int(pad or 0)


def encode_with_offsets(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
  """Token ids of `text` (no special tokens) and each token's (start, end) character span in it."""
  if hasattr(tokenizer, "tok"):                        # hf_tokenizers: the `tokenizers` library
    enc = tokenizer.library_tokenizer(split_special_tokens=True).encode(text, add_special_tokens=False)
    return list(enc.ids), [tuple(o) for o in enc.offsets]
  if isinstance(tokenizer, tokenizers.SentencePieceTokenizer):
    proto = tokenizer.sp.encode(text, return_type="proto")   # offsets in bytes of `text`
    raw = text.encode("utf-8")
    char_at = np.zeros(len(raw) + 1, np.int64)          # byte offset -> character offset
    pos = 0
    for i, ch in enumerate(text):
      n = len(ch.encode("utf-8"))
      char_at[pos:pos + n] = i
      pos += n
    char_at[len(raw)] = len(text)
    return ([p.id for p in proto.pieces],
            [(int(char_at[p.begin]), int(char_at[p.end])) for p in proto.pieces])
  raise DataError(f"extractive QA needs character offsets from the tokenizer; "
                  f"{type(tokenizer).__name__} gives none (use an imported WordPiece or SentencePiece)")


@dataclasses.dataclass
class Features:
  """One row per window. token_offsets: the (start, end) character span in the context of each
  context token, (-1, -1) elsewhere; max_context: whether the token scores in this window."""
  input_ids: np.ndarray        # int32 [n, s]
  input_mask: np.ndarray       # int32 [n, s]
  segment_ids: np.ndarray      # int32 [n, s]
  start_positions: np.ndarray  # int32 [n]
  end_positions: np.ndarray    # int32 [n]
  example_index: np.ndarray    # int32 [n]: the record this window comes from
  token_offsets: np.ndarray    # int32 [n, s, 2]
  max_context: np.ndarray      # bool [n, s]
  truncated_questions: int = 0

  def __len__(self):
    return len(self.example_index)


def windows(n_tokens: int, max_tokens: int, doc_stride: int) -> list[tuple[int, int]]:
  """(start, length) of BERT's sliding windows over n_tokens context tokens."""
  out, start = [], 0
  while True:
    length = min(n_tokens - start, max_tokens)
    out.append((start, length))
    if start + length >= n_tokens:
      return out
    start += min(length, doc_stride)


def _max_context(spans: list[tuple[int, int]], n_tokens: int) -> list[np.ndarray]:
  """Per window, per token of the window: whether this window gives it the most context."""
  best = np.full(n_tokens, -1.0)
  best_span = np.full(n_tokens, -1)
  for k, (start, length) in enumerate(spans):
    pos = np.arange(start, start + length)
    score = np.minimum(pos - start, start + length - 1 - pos) + 0.01 * length
    better = score > best[pos]
    best[pos[better]] = score[better]
    best_span[pos[better]] = k
  return [best_span[start:start + length] == k for k, (start, length) in enumerate(spans)]


def answer_tokens(offsets: list[tuple[int, int]], char_start: int, char_end: int) -> tuple[int, int]:
  """(first, last) context token overlapping the character span [char_start, char_end);
  (-1, -1) if none does."""
  first = last = -1
  for i, (s, e) in enumerate(offsets):
    if e <= s:
      continue
    if e > char_start and s < char_end:
      if first < 0:
        first = i
      last = i
  return first, last


def featurize(tokenizer, records: list[dict], seq_len: int, doc_stride: int,
              max_query_len: int) -> Features:
  """Records (with an `answer` char span for labels, else labels point at [CLS]) -> Features."""
  cls_id, sep_id, pad_id = special_ids(tokenizer)
  if doc_stride < 1:
    raise DataError(f"QaConfig.doc_stride={doc_stride}: must be >= 1 (DOC_STRIDE)")
  rows = []
  truncated = 0
  for r_idx, r in enumerate(records):
    q_ids, _ = encode_with_offsets(tokenizer, r["question"])
    if len(q_ids) > max_query_len:
      q_ids, truncated = q_ids[:max_query_len], truncated + 1
    max_doc = seq_len - len(q_ids) - 3
    if max_doc < 1:
      raise DataError(f"DataConfig.seq_len={seq_len} leaves no room for the context after a "
                      f"{len(q_ids)}-token question: raise seq_len or lower max_query_len "
                      f"(MAX_QUERY_LEN={max_query_len})")
    c_ids, c_off = encode_with_offsets(tokenizer, r["context"])
    ans = answer_tokens(c_off, *r["answer"]) if r.get("answer") else (-1, -1)
    spans = windows(len(c_ids), max_doc, doc_stride)
    for (start, length), maxc in zip(spans, _max_context(spans, len(c_ids))):
      ids = [cls_id] + q_ids + [sep_id] + c_ids[start:start + length] + [sep_id]
      first = len(q_ids) + 2
      offsets = np.full((seq_len, 2), -1, np.int32)
      offsets[first:first + length] = np.asarray(c_off[start:start + length], np.int32).reshape(-1, 2)
      mc = np.zeros(seq_len, bool)
      mc[first:first + length] = maxc
      sp = ep = 0
      if ans[0] >= 0 and start <= ans[0] and ans[1] <= start + length - 1:
        sp, ep = first + ans[0] - start, first + ans[1] - start
      seg = [0] * first + [1] * (length + 1)
      rows.append((ids, seg, sp, ep, r_idx, offsets, mc))
  n, s = len(rows), seq_len
  f = Features(np.full((n, s), pad_id, np.int32), np.zeros((n, s), np.int32),
               np.zeros((n, s), np.int32), np.zeros(n, np.int32), np.zeros(n, np.int32),
               np.zeros(n, np.int32), np.full((n, s, 2), -1, np.int32), np.zeros((n, s), bool),
               truncated)
  for i, (ids, seg, sp, ep, r_idx, offsets, mc) in enumerate(rows):
    f.input_ids[i, :len(ids)], f.input_mask[i, :len(ids)], f.segment_ids[i, :len(ids)] = ids, 1, seg
    f.start_positions[i], f.end_positions[i], f.example_index[i] = sp, ep, r_idx
    f.token_offsets[i], f.max_context[i] = offsets, mc
  return f


# ----------------------------------------------------------------------------- sources


def _files(cfg: DataConfig) -> tuple[str, str]:
  train = next((f for f in cfg.files if f), "")
  val = next((f for f in cfg.val_files if f), "")
  return (readers.resolve(train, cfg.data_dir) if train else "",
          readers.resolve(val, cfg.data_dir) if val else "")


def load_records(cfg: DataConfig, side: str) -> tuple[list[dict], str]:
  """(records of the train or eval side, after the article range; a description of the source)."""
  train_path, val_path = _files(cfg)
  spec = cfg.train_articles if side == "train" else cfg.eval_articles
  what = f"DataConfig.{side}_articles"
  if train_path or val_path:
    path = train_path if side == "train" else (val_path or train_path)
    if not path:
      raise DataError("extractive QA needs a train file: DataConfig.files = [%TRAIN_FILE] "
                      "(or DataConfig.tfds_name)")
    if path.startswith(readers.TFDS_PREFIX):          # 'tfds:NAME:SPLIT', as readers.read_table
      records, source = read_tfds(*readers.parse_tfds_spec(path)), path
    else:
      records, source = read_file(path), path
  elif cfg.tfds_name:
    split = cfg.tfds_train_split if side == "train" else cfg.tfds_eval_split
    records = read_tfds(cfg.tfds_name, split)
    source = f"TFDS {cfg.tfds_name} [{split}]"
  else:
    raise DataError("extractive QA needs data: DataConfig.files = [%TRAIN_FILE] (SQuAD v1.1 JSON) "
                    "or DataConfig.tfds_name (e.g. 'squad' or 'xquad/en')")
  picked = select_articles(records, spec, what, source)
  if not picked:
    raise DataError(f"{source}: no questions in the articles {spec!r} ({what})")
  return picked, f"{source} articles {spec or 'all'}"


SHUFFLE_SALT = 0x7161   # this pipeline's stream of per-epoch shuffles (data.lm.epoch_rows)


@dataclasses.dataclass
class QAData(KeyedTable):
  shuffle_salt = SHUFFLE_SALT   # a class attribute, not a field
  cfg: DataConfig
  tokenizer: object
  train: Features
  val: Features
  val_records: list

  @classmethod
  def build(cls, cfg: DataConfig, tokenizer=None) -> "QAData":
    if cfg.scrub_pii:
      raise DataError("DataConfig.scrub_pii is not available for extractive QA: placeholders would "
                      "move the answer offsets; scrub the SQuAD JSON beforehand")
    if tokenizer is None:
      tokenizer = tokenizers.build(cfg.tokenizer)
    train_recs, train_src = load_records(cfg, "train")
    val_recs, val_src = load_records(cfg, "eval")
    train_path, val_path = _files(cfg)
    same = (not val_path or val_path == train_path) if train_path else \
        cfg.tfds_train_split == cfg.tfds_eval_split
    if same:
      overlap = {r["id"] for r in train_recs} & {r["id"] for r in val_recs}
      if overlap:
        log.warning("%d eval questions are also train questions (train %s, eval %s): set "
                    "QaConfig.train_articles / eval_articles to disjoint ranges",
                    len(overlap), train_src, val_src)
    train_recs, skipped = check_answers(train_recs, train_src)
    if not train_recs:
      raise DataError(f"{train_src}: no question has an answer that matches its answer_start")
    val_labeled, _ = check_answers(val_recs, val_src)
    train = featurize(tokenizer, train_recs, cfg.seq_len, cfg.doc_stride, cfg.max_query_len)
    val = featurize(tokenizer, val_labeled or val_recs, cfg.seq_len, cfg.doc_stride,
                    cfg.max_query_len)
    log.info("QA data: %d train questions -> %d windows (%s; %d skipped), %d eval questions -> "
             "%d windows (%s); seq_len %d, doc_stride %d", len(train_recs), len(train), train_src,
             skipped, len(val_recs), len(val), val_src, cfg.seq_len, cfg.doc_stride)
    return cls(cfg, tokenizer, train, val, val_recs)

  # --- batches, a pure function of (seed, step)

  def _rows(self, f: Features, idx: np.ndarray, real: np.ndarray) -> dict:
    return {"input_ids": f.input_ids[idx], "input_mask": f.input_mask[idx],
            "segment_ids": f.segment_ids[idx], "start_positions": f.start_positions[idx],
            "end_positions": f.end_positions[idx], "weights": real.astype(np.float32)}

  def row_shapes(self) -> dict:
    s = self.cfg.seq_len
    shapes = {"input_ids": (s,), "input_mask": (s,), "segment_ids": (s,),
              "start_positions": (), "end_positions": (), "weights": ()}
    assert tuple(shapes) == KEYS
    return shapes


def eval_source(cfg: DataConfig, eval_file: str = "") -> tuple[list[dict], str]:
  """The records `bigmodel evaluate` scores: an explicit file whole, else the configured eval side."""
  if eval_file:
    path = readers.resolve(eval_file, cfg.data_dir)
    return read_file(path), path
  return load_records(cfg, "eval")
