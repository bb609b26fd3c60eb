"""`bigmodel evaluate` and `bigmodel predict` for the recommenders (objectives sasrec, bert4rec),
and the two baselines they are compared with.

Protocol (the field's, as Petrov & Macdonald 2022 and Klenitskiy & Vasilev 2023): leave-one-out
(each user's last item is the test target, the one before it the validation target), full
ranking over the whole catalogue (no sampled negatives), the user's already-seen items left
out of the ranking, HR@10, NDCG@10 and MRR averaged over users. Ties rank by item id.

    evaluate(workdir, exp)  -> {"step", "test": {model}, "validation": {model},
                                "baselines": {"popular": {"test", "validation"}, "itemknn": ...}}
    predict(workdir, exp, users.jsonl) -> per line {"user"?, "items": [{"item", "title",
                                "score"}..], "unknown_items": [..]}

Baselines, on the same split and ranking code (`objectives.recsys.ranks`):
  popular   score = the item's interaction count in the histories of that split
  itemknn   score = sum over the user's history h of cosine(h, item), the cosine of two items'
            columns in the binary user-item matrix of those histories (co-occurrence over
            sqrt of the counts), self-similarity 0; RecsysConfig.knn_neighbors > 0 keeps
            each item's strongest neighbours only

Predict input, one JSON object a line: {"history": [item ids, oldest first]} (ids as in the
data file; numbers or strings) and optionally "user"; or {"user": ID} alone, whose history is
then read from the run's data file. Unknown item ids are named in "unknown_items" and left
out; a line with no known item gets an "error" and the others are still answered.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np

from bigmodel import storage
from bigmodel.data import readers
from bigmodel.data import recsys as rec_data
from bigmodel.data.sources import DataError
from bigmodel.objectives import recsys as rec_obj

log = logging.getLogger(__name__)

BASELINES = ("popular", "itemknn")


# ----------------------------------------------------------------------------- baselines


def history_matrix(histories, vocab_size: int) -> np.ndarray:
  """Binary [users, vocab] matrix of the items in each history."""
  m = np.zeros((len(histories), vocab_size), np.float32)
  for u, h in enumerate(histories):
    m[u, np.asarray(h, np.int64)] = 1.0
  return m


def popular_scores(histories, vocab_size: int) -> np.ndarray:
  """[vocab] interaction counts in the histories."""
  counts = np.zeros(vocab_size, np.float64)
  for h in histories:
    np.add.at(counts, np.asarray(h, np.int64), 1.0)
  return counts.astype(np.float32)


def item_similarity(histories, vocab_size: int, neighbors: int = 0) -> np.ndarray:
  """[vocab, vocab] cosine of items' user columns (0 on the diagonal and for unseen items)."""
  m = history_matrix(histories, vocab_size).astype(np.float64)
  co = m.T @ m
  norm = np.sqrt(np.diag(co))
  sim = co / np.maximum(np.outer(norm, norm), 1e-12)
  np.fill_diagonal(sim, 0.0)
  if neighbors and neighbors < vocab_size:
    cut = -np.partition(-sim, neighbors - 1, axis=1)[:, neighbors - 1:neighbors]
    sim = np.where(sim >= cut, sim, 0.0)
  return sim.astype(np.float32)


def baseline_scores(name: str, histories, vocab_size: int, neighbors: int = 0):
  """f(rows of users) -> [b, vocab] scores of a baseline fitted on `histories`."""
  if name == "popular":
    counts = popular_scores(histories, vocab_size)
    return lambda users: np.broadcast_to(counts, (len(users), vocab_size))
  if name == "itemknn":
    sim = item_similarity(histories, vocab_size, neighbors)
    m = history_matrix(histories, vocab_size)
    return lambda users: m[users] @ sim
  raise DataError(f"unknown baseline {name!r}; known: {list(BASELINES)}")


_ranks = jax.jit(rec_obj.ranks)
_metrics = jax.jit(rec_obj.rank_metrics, static_argnums=2)


def ranking_metrics(score_fn, table: rec_data.EvalTable, num_ids: int, cutoff: int,
                    batch: int = 256) -> dict:
  """HR@cutoff, NDCG@cutoff, MRR of `score_fn(users) -> [b, v]` over an EvalTable."""
  sums: dict[str, float] = {}
  n = len(table)
  for start in range(0, n, batch):
    users = np.arange(start, min(n, start + batch))
    scores = np.asarray(score_fn(users), np.float32)
    rank = _ranks(scores, table.target[users], table.exclude[users],
                  np.full(len(users), num_ids, np.int32))
    for k, v in _metrics(rank, jnp.ones(len(users)), cutoff).items():
      sums[k] = sums.get(k, 0.0) + float(v)
  out = rec_obj.summarize(sums, cutoff)
  out["users"] = n
  return out


def evaluate_baselines(data: rec_data.Interactions, seq_len: int, rc: rec_data.RecsysConfig,
                       splits=("validation", "test")) -> dict:
  """{baseline: {split: metrics}} on the leave-one-out splits of `data`."""
  out: dict = {b: {} for b in BASELINES}
  for split in splits:
    histories, targets = data.split(split)
    table = rec_data.eval_table(data.users, histories, targets, seq_len, cloze=False)
    for name in BASELINES:
      fn = baseline_scores(name, histories, data.vocab.vocab_size, rc.knn_neighbors)
      out[name][split] = ranking_metrics(fn, table, data.vocab.vocab_size, rc.cutoff)
  return out


# ----------------------------------------------------------------------------- a trained model


class Recommender:
  """A restored sasrec / bert4rec run: scores a batch of histories over the catalogue."""

  def __init__(self, workdir: str, exp):
    from bigmodel.train import loop
    if exp.train.objective not in rec_obj.SCORERS:
      raise DataError(f"{workdir} holds a {exp.train.objective!r} run, not a recommender "
                      f"({sorted(rec_obj.SCORERS)})")
    self.exp, self.rc = exp, rec_data.RecsysConfig()
    self.comp, self.params, self.vocab, self.step = loop.restore_for_inference(workdir, exp)
    if not isinstance(self.vocab, rec_data.ItemVocab):
      raise DataError(f"{workdir}/tokenizer.json is not an item catalogue")
    self.cloze = exp.train.objective == "bert4rec"
    scorer = rec_obj.SCORERS[exp.train.objective]
    self._scores = jax.jit(lambda p, x: scorer(self.comp.model, p, x))
    self.titles = load_titles(exp.data, self.rc)

  def rows(self, histories) -> np.ndarray:
    return rec_data.eval_table([""] * len(histories), histories, np.zeros(len(histories)),
                               self.exp.data.seq_len, self.cloze).inputs

  def scores(self, histories, batch: int = 0) -> np.ndarray:
    """[n, vocab] scores of the next item after each history (lists of ids)."""
    batch = batch or self.exp.train.batch_size
    inputs = self.rows(histories)
    out = []
    for start in range(0, len(inputs), batch):
      chunk = inputs[start:start + batch]
      padded = np.concatenate([chunk, np.repeat(chunk[-1:], batch - len(chunk), 0)])
      out.append(np.asarray(self._scores(self.params, padded))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, self.exp.model.vocab_size), np.float32)

  def top_k(self, history: list[int], k: int) -> list[dict]:
    """The k best items not in the history: [{"item", "title", "score"}]."""
    s = self.scores([history])[0].copy()
    s[:rec_data.FIRST_ITEM] = -np.inf
    s[self.vocab.vocab_size:] = -np.inf
    s[np.asarray(history, np.int64)] = -np.inf
    order = np.argsort(-s, kind="stable")[:k]
    return [{"item": self.vocab.item(int(i)), "title": self.titles.get(self.vocab.item(int(i))),
             "score": round(float(s[i]), 4)} for i in order if np.isfinite(s[i])]

  def recommend(self, history, k: int) -> dict:
    """{"items": top k, "unknown_items": ids not in the catalogue} (or "error" with none known)."""
    ids = [self.vocab.id(i) for i in history]
    unknown = [i for i, j in zip(history, ids) if j is None]
    known = [j for j in ids if j is not None]
    out: dict = {"unknown_items": unknown} if unknown else {}
    if not known:
      out["error"] = (f"no item of the history is in the catalogue ({len(self.vocab)} items); "
                      f"unknown: {unknown[:10]}")
      return out
    return {"items": self.top_k(known, k), **out}


def load_titles(cfg, rc: rec_data.RecsysConfig) -> dict:
  """{item id: title} from RecsysConfig.titles_file (MovieLens u.item, or a table); {} if none."""
  if not rc.titles_file:
    return {}
  path = readers.resolve(rc.titles_file, cfg.data_dir)
  if not storage.exists(path):
    log.warning("titles file %s does not exist: recommendations carry ids only", path)
    return {}
  if path.endswith(".item"):      # MovieLens: id|title|date|..., Latin-1
    text = storage.read_bytes(path).decode("latin-1")
    return {line.split("|")[0]: line.split("|")[1] for line in text.splitlines() if "|" in line}
  rows = readers.read_table(path)
  if rc.title_item_column not in rows[0] or rc.title_column not in rows[0]:
    raise DataError(f"{path}: needs the columns {rc.title_item_column!r} and {rc.title_column!r} "
                    f"(RecsysConfig.title_item_column / title_column); it has {list(rows[0])}")
  return {str(r[rc.title_item_column]): str(r[rc.title_column]) for r in rows}


class _Split:
  """A pipeline whose eval batches are another split's table (for loop.evaluate)."""

  def __init__(self, data: rec_data.RecsysData, table: rec_data.EvalTable):
    self.data, self.table = data, table

  def eval_batches(self, global_batch: int, host_rows=None):
    return self.data.eval_batches(global_batch, host_rows, self.table)


def evaluate_recsys(workdir: str, exp, eval_file: str = "") -> dict:
  """The model on the test and validation splits, and the baselines beside it (eval_file:
  another interactions file in the run's columns; its items outside the catalogue go)."""
  import dataclasses
  from bigmodel.train import loop
  if eval_file:
    exp = dataclasses.replace(exp, data=dataclasses.replace(exp.data, files=(eval_file,)))
  rec = Recommender(workdir, exp)
  d = rec_data.RecsysData.build(exp.data, rec.vocab, cloze=rec.cloze, rc=rec.rc)
  out: dict = {"step": rec.step, "file": d.data.source, "users": len(d.val),
               "protocol": "leave-one-out, full ranking over the catalogue, seen items excluded"}
  histories, targets = d.data.split("test")
  test = rec_data.eval_table(d.data.users, histories, targets, exp.data.seq_len, rec.cloze)
  out["test"] = loop.evaluate(rec.comp, rec.params, _Split(d, test))
  out["validation"] = loop.evaluate(rec.comp, rec.params, d)
  out["baselines"] = evaluate_baselines(d.data, exp.data.seq_len, rec.rc)
  return out


def read_requests(path: str) -> list[dict]:
  """The predict requests of a JSONL file (readers.read_table), each checked."""
  rows = readers.read_table(path, fmt="jsonl")
  for n, obj in enumerate(rows, 1):
    if not ("history" in obj or "user" in obj):
      raise DataError(f"{path}, request {n}: expected an object with \"history\" (item ids, "
                      f"oldest first) or \"user\", e.g. {{\"history\": [\"50\", \"181\"]}}")
    if "history" in obj and not isinstance(obj["history"], list):
      raise DataError(f"{path}, request {n}: \"history\" must be a list of item ids")
  return rows


def predict_recsys(workdir: str, exp, input_file: str) -> list[dict]:
  rec = Recommender(workdir, exp)
  requests = read_requests(readers.resolve(input_file, exp.data.data_dir))
  known_users = {}
  if any("history" not in r for r in requests):
    data = rec_data.Interactions.load(exp.data, rec.rc, rec.vocab)
    known_users = {u: [rec.vocab.item(int(i)) for i in s] for u, s in zip(data.users, data.seqs)}
  out = []
  for r in requests:
    user = r.get("user")
    if "history" in r:
      history = [str(i) for i in r["history"]]
    elif str(user) in known_users:
      history = known_users[str(user)]
    else:
      out.append({"user": user, "error": f"user {user!r} is not in the run's data; send "
                  f"\"history\" instead"})
      continue
    answer = rec.recommend(history, rec.rc.top_k)
    out.append({"user": user, **answer} if user is not None else answer)
  return out
