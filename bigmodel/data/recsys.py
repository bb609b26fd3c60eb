"""User histories for sequential recommendation (objectives `sasrec` and `bert4rec`).

Input: interactions (user, item, time[, rating]) from a TSV/CSV/JSONL file (DataConfig.files[0],
the recipes' TRAIN_FILE, relative paths under DATA_DIR; MovieLens `u.data` is a headerless TSV),
or a TFDS split (`tfds:movielens/100k-ratings:train`). Columns are named by RecsysConfig; user
and item ids are strings. Then, in order:

  1. rows with rating < RecsysConfig.min_rating are dropped (when rating_column is set);
  2. each user's interactions are sorted by time, stably (ties keep the file order);
  3. users and items below min_user_count / min_item_count interactions are dropped,
     repeatedly until none is left below (5 and 5, as the SASRec and BERT4Rec papers);
  4. users left with fewer than 3 interactions (a train, a validation and a test item) are
     dropped and counted in the log;
  5. items get ids: 0 pad, 1 mask, then the catalogue (ItemVocab, saved to the workdir as
     tokenizer.json so that eval, predict and serve use the run's ids);
  6. leave-one-out split: each user's last item is the test target, the one before it the
     validation target, the rest the training sequence.

Rows are right-aligned (padding first), so the newest item always sits at position seq_len-1.
  causal (sasrec)   a training row is a window of seq_len + 1 items of one user's training
                    sequence (windows end at the newest item and then every
                    DataConfig.window_stride items back, default seq_len): inputs are
                    items 0..s-1, targets 1..s, every real target weighs 1
  cloze (bert4rec)  a training row is a window of seq_len items (the same ends); mask_probability of its items
                    (at least one) become the mask id, drawn afresh for every example key;
                    last_mask_probability of the rows instead mask only their newest item
  evaluation        the newest seq_len items of the history (cloze: seq_len - 1 and a mask
                    appended), the target, and the whole history (`exclude`) so that ranking
                    leaves seen items out

Batches are a pure function of (seed, step) as in `data/finetune.py`: global example k is row
`epoch_permutation(seed, k // n)[k % n]`, and a cloze row's masks come from (seed, k), so
resuming is exact. Evaluation batches cover every user once (padding rows weigh 0).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
from typing import Sequence

import gin
import numpy as np

from bigmodel import storage
from bigmodel.config import DataConfig
from bigmodel.data import readers
from bigmodel.data.sources import DataError

log = logging.getLogger(__name__)

PAD, MASK = 0, 1
FIRST_ITEM = 2            # item ids start here
SHUFFLE_SALT = 0x726563   # this pipeline's stream of per-epoch shuffles
MIN_HISTORY = 3           # train + validation + test


@gin.configurable
@dataclasses.dataclass(frozen=True)
class RecsysConfig:
  """The recommender task's settings (the pipeline above, its objectives and evaluation)."""
  user_column: str = "user_id"
  item_column: str = "item_id"
  time_column: str = "timestamp"   # numbers (unix time) or ISO 8601 dates; '' keeps file order
  rating_column: str = ""          # '' : every interaction counts
  min_rating: float = 0.0          # keep interactions rated >= this (with rating_column)
  column_names: Sequence[str] = ()  # the columns of a headerless TSV/CSV (MovieLens u.data)
  file_format: str = ""            # tsv | csv | jsonl; '' : from the extension
  min_user_count: int = 5
  min_item_count: int = 5
  mask_probability: float = 0.2    # cloze: the share of a row's items masked in training
  last_mask_probability: float = 0.0  # cloze: the share of training rows with only their newest
                                      # item masked (the inference task: BERT4Rec's extra rows)
  cutoff: int = 10                 # HR@cutoff and NDCG@cutoff
  top_k: int = 10                  # predict / serve: items returned per user
  titles_file: str = ""            # item titles: MovieLens u.item, or TSV/CSV/JSONL
  title_item_column: str = "item_id"
  title_column: str = "title"
  knn_neighbors: int = 0           # item-kNN baseline: neighbours kept per item (0: all)

  def __post_init__(self):
    if not 0 < self.mask_probability < 1:
      raise DataError(f"RecsysConfig.mask_probability={self.mask_probability}: expected a "
                      f"fraction in (0, 1)")
    if not 0 <= self.last_mask_probability <= 1:
      raise DataError(f"RecsysConfig.last_mask_probability={self.last_mask_probability}: "
                      f"expected a fraction in [0, 1]")
    if self.min_user_count < 1 or self.min_item_count < 1:
      raise DataError("RecsysConfig.min_user_count and min_item_count must be >= 1")
    if self.cutoff < 1 or self.top_k < 1:
      raise DataError("RecsysConfig.cutoff and top_k must be >= 1")


OBJECTIVES = ("sasrec", "bert4rec")


def operative(exp) -> RecsysConfig | None:
  """For a recommender run, RecsysConfig() now: gin then writes its bindings into the run's
  operative config (config.gin), and a bad value fails before training starts."""
  return RecsysConfig() if exp.train.objective in OBJECTIVES else None


# ----------------------------------------------------------------------------- the catalogue


class ItemVocab:
  """Item ids: 0 pad, 1 mask, then the catalogue in sorted order. The run's "tokenizer"
  (saved as tokenizer.json, type "items"; `tokenizers.load` reads it back)."""
  eos_id = None

  def __init__(self, items: Sequence[str]):
    self.items = [str(i) for i in items]
    self.index = {item: i + FIRST_ITEM for i, item in enumerate(self.items)}
    self.vocab_size = len(self.items) + FIRST_ITEM

  def __len__(self):
    return len(self.items)

  def id(self, item) -> int | None:
    return self.index.get(str(item))

  def item(self, i: int) -> str:
    return self.items[i - FIRST_ITEM]

  def encode(self, items) -> list[int]:
    return [self.index[str(i)] for i in items if str(i) in self.index]

  def decode(self, ids) -> list[str]:
    return [self.item(int(i)) for i in ids if FIRST_ITEM <= int(i) < self.vocab_size]

  def save(self, directory: str) -> str:
    path = storage.join(directory, "tokenizer.json")
    storage.write_json(path, {"type": "items", "items": self.items}, indent=None)
    return path


def _sort_key(ids):
  """Numeric order when every id is an integer, else string order."""
  try:
    return sorted(ids, key=int)
  except ValueError:
    return sorted(ids)


# ----------------------------------------------------------------------------- reading


def _time_value(v, path: str, row: int, column: str) -> float:
  if isinstance(v, (int, float)) and not isinstance(v, bool):
    return float(v)
  s = str(v).strip()
  try:
    return float(s)
  except ValueError:
    pass
  try:
    return datetime.datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()
  except ValueError:
    raise DataError(f"{path}, row {row}: {column!r} is {s!r}, not a number (unix time) or an "
                    f"ISO 8601 date; point RecsysConfig.time_column (TIME_COLUMN) at the "
                    f"timestamp column") from None


def _check_columns(rows: list[dict], rc: RecsysConfig, path: str) -> None:
  have = list(rows[0])
  need = {"user_column (USER_COLUMN)": rc.user_column, "item_column (ITEM_COLUMN)": rc.item_column}
  if rc.time_column:
    need["time_column (TIME_COLUMN)"] = rc.time_column
  if rc.rating_column:
    need["rating_column (RATING_COLUMN)"] = rc.rating_column
  for field, col in need.items():
    if not col or col not in have:
      hint = (" (a headerless file needs RecsysConfig.column_names / COLUMN_NAMES)"
              if not rc.column_names else "")
      raise DataError(f"{path}: no column {col!r} for RecsysConfig.{field}; the columns are "
                      f"{have}{hint}")


def read_interactions(path: str, rc: RecsysConfig) -> list[tuple[str, str, float]]:
  """(user, item, time) per kept row of a file or `tfds:NAME:SPLIT`, in file order."""
  if path.startswith(readers.TFDS_PREFIX):
    rows = readers.tfds_rows(path)
  else:
    rows = readers.read_table(path, rc.column_names, rc.file_format)
  _check_columns(rows, rc, path)
  out, low, missing = [], 0, 0
  for n, r in enumerate(rows, 1):
    user, item = r.get(rc.user_column), r.get(rc.item_column)
    if user in (None, "") or item in (None, ""):
      missing += 1
      continue
    if rc.rating_column:
      try:
        rating = float(r[rc.rating_column])
      except (TypeError, ValueError):
        raise DataError(f"{path}, row {n}: rating {r[rc.rating_column]!r} is not a number") from None
      if rating < rc.min_rating:
        low += 1
        continue
    t = _time_value(r[rc.time_column], path, n, rc.time_column) if rc.time_column else float(n)
    out.append((str(user), str(item), t))
  if missing:
    log.warning("%s: %d rows without a user or item id were dropped", path, missing)
  if low:
    log.info("%s: %d rows rated below MIN_RATING=%g were dropped", path, low, rc.min_rating)
  if not out:
    raise DataError(f"{path}: no interactions left to read (MIN_RATING={rc.min_rating})")
  return out


def user_sequences(rows, rc: RecsysConfig, path: str = "") -> tuple[list[str], list[list[str]], dict]:
  """(users, their items sorted by time, stable on ties, counts of what was dropped) after the
  iterative min-count filter and the MIN_HISTORY rule."""
  by_user: dict[str, list[tuple[float, int, str]]] = {}
  for n, (user, item, t) in enumerate(rows):
    by_user.setdefault(user, []).append((t, n, item))
  seqs = {u: [item for _, _, item in sorted(v)] for u, v in by_user.items()}
  dropped = {"users_min_count": 0, "items_min_count": 0, "users_short": 0}
  while True:
    counts: dict[str, int] = {}
    for s in seqs.values():
      for item in s:
        counts[item] = counts.get(item, 0) + 1
    rare = {i for i, c in counts.items() if c < rc.min_item_count}
    if rare:
      dropped["items_min_count"] += len(rare)
      seqs = {u: [i for i in s if i not in rare] for u, s in seqs.items()}
    few = [u for u, s in seqs.items() if len(s) < rc.min_user_count]
    dropped["users_min_count"] += len(few)
    for u in few:
      del seqs[u]
    if not rare and not few:
      break
  short = [u for u, s in seqs.items() if len(s) < MIN_HISTORY]
  for u in short:
    del seqs[u]
  dropped["users_short"] = len(short)
  if short:
    log.warning("%s: %d users with fewer than %d interactions after filtering were dropped "
                "(leave-one-out needs a train, a validation and a test item)", path, len(short),
                MIN_HISTORY)
  if not seqs:
    raise DataError(f"{path}: no user has {max(MIN_HISTORY, rc.min_user_count)} or more "
                    f"interactions after the min-count filter (MIN_USER_COUNT="
                    f"{rc.min_user_count}, MIN_ITEM_COUNT={rc.min_item_count}); lower them "
                    f"or add data")
  users = _sort_key(seqs)
  return users, [seqs[u] for u in users], dropped


# ----------------------------------------------------------------------------- rows


def right_align(items: Sequence[int], width: int) -> np.ndarray:
  """The newest `width` ids, padded with PAD on the left."""
  row = np.full(width, PAD, np.int32)
  tail = list(items)[-width:] if width else []
  if tail:
    row[width - len(tail):] = tail
  return row


def windows(seqs: Sequence[np.ndarray], width: int, stride: int, min_len: int) -> np.ndarray:
  """[n, width] right-aligned windows of each sequence, from its newest item backwards every
  `stride` items; windows shorter than min_len items are left out."""
  rows = []
  for s in seqs:
    end = len(s)
    while end >= min_len:
      rows.append(right_align(s[max(0, end - width):end], width))
      end -= stride
  return np.stack(rows) if rows else np.zeros((0, width), np.int32)


@dataclasses.dataclass
class EvalTable:
  """One ranking example per user: the model's input row, the target, the whole history."""
  users: list[str]
  inputs: np.ndarray     # int32 [n, s]
  target: np.ndarray     # int32 [n]
  exclude: np.ndarray    # int32 [n, h]: the history's ids, PAD-padded (seen items)

  def __len__(self):
    return len(self.target)


def eval_table(users, histories: Sequence[np.ndarray], targets, seq_len: int, cloze: bool) -> EvalTable:
  inputs = np.stack([right_align(list(h[-(seq_len - 1):]) + [MASK], seq_len) if cloze
                     else right_align(h, seq_len) for h in histories])
  width = max(1, max(len(h) for h in histories))
  exclude = np.stack([np.pad(np.asarray(h, np.int32), (0, width - len(h))) for h in histories])
  return EvalTable(list(users), inputs.astype(np.int32), np.asarray(targets, np.int32),
                   exclude.astype(np.int32))


def cloze_mask(window: np.ndarray, key: int, seed: int, prob: float, slots: int,
               last_prob: float = 0.0):
  """(masked row, positions [slots], targets [slots], weights [slots]) of one training row:
  round(prob * real items), at least 1, masked at positions drawn from (seed, key); or, with
  probability last_prob (drawn from the same key), only the newest item (position s-1)."""
  real = np.flatnonzero(window != PAD)
  rng = np.random.default_rng([seed, SHUFFLE_SALT, int(key)])
  if last_prob and rng.random() < last_prob:
    chosen = real[-1:]
    n = 1
  else:
    n = min(slots, len(real), max(1, int(round(prob * len(real)))))
    chosen = np.sort(rng.choice(real, size=n, replace=False))
  row = window.copy()
  row[chosen] = MASK
  pos = np.zeros(slots, np.int32)
  tgt = np.zeros(slots, np.int32)
  w = np.zeros(slots, np.float32)
  pos[:n], tgt[:n], w[:n] = chosen, window[chosen], 1.0
  return row, pos, tgt, w


def cloze_slots(seq_len: int, prob: float) -> int:
  return max(1, math.ceil(prob * seq_len))


# ----------------------------------------------------------------------------- the pipeline


@dataclasses.dataclass
class Interactions:
  """The filtered, split data set: ids per user, oldest first."""
  vocab: ItemVocab
  users: list[str]
  seqs: list[np.ndarray]        # each user's whole sequence of item ids
  source: str

  def train_seq(self, u: int) -> np.ndarray:
    return self.seqs[u][:-2]

  def split(self, which: str) -> tuple[list[np.ndarray], np.ndarray]:
    """(histories, targets) of the validation or test split."""
    if which not in ("validation", "test"):
      raise ValueError(f"split {which!r}: expected 'validation' or 'test'")
    cut = 2 if which == "validation" else 1
    return [s[:-cut] for s in self.seqs], np.array([s[-cut] for s in self.seqs], np.int32)

  @classmethod
  def load(cls, cfg: DataConfig, rc: RecsysConfig, vocab: ItemVocab | None = None) -> "Interactions":
    path = source_path(cfg)
    rows = read_interactions(path, rc)
    if vocab is not None:      # the run's catalogue (a resume, eval, predict): other items go
      unknown = sum(1 for _, item, _ in rows if vocab.id(item) is None)
      if unknown:
        log.info("%s: %d interactions with items outside the run's catalogue (below the min "
                 "count in training, or new) were dropped", path, unknown)
      rows = [r for r in rows if vocab.id(r[1]) is not None]
    users, seqs, dropped = user_sequences(rows, rc, path)
    if vocab is None:
      vocab = ItemVocab(_sort_key({i for s in seqs for i in s}))
    ids = [np.asarray([vocab.id(i) for i in s], np.int32) for s in seqs]
    n = sum(len(s) for s in ids)
    log.info("recsys data: %s; %d interactions of %d users over %d items kept (dropped by the "
             "min counts: %d users, %d items; %d users too short)", path, n, len(users),
             len(vocab), dropped["users_min_count"], dropped["items_min_count"],
             dropped["users_short"])
    return cls(vocab, users, ids, path)


def source_path(cfg: DataConfig) -> str:
  files = [f for f in cfg.files if f]
  if files:
    return readers.resolve(files[0], cfg.data_dir)
  if cfg.tfds_name:
    return f"{readers.TFDS_PREFIX}{cfg.tfds_name}:train"
  raise DataError("the recommender needs interactions: DataConfig.files = [%TRAIN_FILE] (e.g. "
                  "'movielens_100k/u.data' under DATA_DIR) or DataConfig.tfds_name = "
                  "'movielens/100k-ratings'")


@dataclasses.dataclass
class RecsysData:
  """train_batches / eval_batches of one run (the build_data contract of bigmodel.objectives)."""
  cfg: DataConfig
  rc: RecsysConfig
  data: Interactions
  cloze: bool
  train: np.ndarray            # int32 [n, s + 1] (causal) or [n, s] (cloze) windows
  val: EvalTable

  @property
  def tokenizer(self) -> ItemVocab:
    return self.data.vocab

  @classmethod
  def build(cls, cfg: DataConfig, tokenizer=None, cloze: bool = False,
            rc: RecsysConfig | None = None, split: str = "validation") -> "RecsysData":
    rc = rc or RecsysConfig()
    if tokenizer is not None and not isinstance(tokenizer, ItemVocab):
      raise DataError(f"a recommender run's tokenizer is its item catalogue; got "
                      f"{type(tokenizer).__name__} (is the workdir another task's?)")
    data = Interactions.load(cfg, rc, tokenizer)
    s = cfg.seq_len
    stride = cfg.window_stride or s
    train = windows([data.train_seq(u) for u in range(len(data.users))],
                    s if cloze else s + 1, stride, 1 if cloze else 2)
    if not len(train):
      raise DataError(f"{data.source}: no training sequence is long enough")
    histories, targets = data.split(split)
    val = eval_table(data.users, histories, targets, s, cloze)
    log.info("recsys rows: %d training windows of %d items, %d %s users", len(train),
             train.shape[1], len(val), split)
    return cls(cfg, rc, data, cloze, train, val)

  # --- rows, a pure function of example keys

  def train_rows(self, keys: np.ndarray) -> dict:
    from bigmodel.data.lm import epoch_rows
    idx = epoch_rows(keys, len(self.train), self.cfg.seed, SHUFFLE_SALT)
    w = self.train[idx]
    if not self.cloze:
      return {"inputs": w[:, :-1], "targets": w[:, 1:],
              "weights": (w[:, 1:] != PAD).astype(np.float32)}
    slots = cloze_slots(self.cfg.seq_len, self.rc.mask_probability)
    parts = [cloze_mask(row, k, self.cfg.seed, self.rc.mask_probability, slots,
                        self.rc.last_mask_probability) for row, k in zip(w, keys)]
    return {"inputs": np.stack([p[0] for p in parts]), "positions": np.stack([p[1] for p in parts]),
            "targets": np.stack([p[2] for p in parts]), "weights": np.stack([p[3] for p in parts])}

  def train_shapes(self) -> dict:
    s = self.cfg.seq_len
    p = cloze_slots(s, self.rc.mask_probability) if self.cloze else s
    shapes = {"inputs": (s,), "targets": (p,), "weights": (p,)}
    if self.cloze:
      shapes["positions"] = (p,)
    return shapes

  def eval_rows(self, keys: np.ndarray, table: EvalTable | None = None) -> dict:
    table = table or self.val
    n = len(table)
    idx = keys % n
    return {"inputs": table.inputs[idx], "target": table.target[idx],
            "exclude": table.exclude[idx],
            "num_ids": np.full(len(keys), self.tokenizer.vocab_size, np.int32),
            "weights": (keys < n).astype(np.float32)}

  def eval_shapes(self, table: EvalTable | None = None) -> dict:
    table = table or self.val
    return {"inputs": (self.cfg.seq_len,), "target": (), "exclude": (table.exclude.shape[1],),
            "num_ids": (), "weights": ()}

  def train_batches(self, global_batch: int, start_step: int = 0, host_rows=None):
    from bigmodel.data.lm import keyed_batches
    stop = np.iinfo(np.int64).max // (2 * global_batch)
    return keyed_batches(self.train_rows, self.train_shapes(), ("weights",), global_batch,
                         start_step, stop, host_rows)

  def eval_batches(self, global_batch: int, host_rows=None, table: EvalTable | None = None):
    """Every user of `table` (default: validation) once."""
    from bigmodel.data.lm import keyed_batches
    table = table or self.val
    steps = -(-len(table) // global_batch)
    return keyed_batches(lambda k: self.eval_rows(k, table), self.eval_shapes(table),
                         ("weights",), global_batch, 0, steps, host_rows)
