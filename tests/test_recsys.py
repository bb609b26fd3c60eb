"""Sequential recommendation: the user-history pipeline (ordering, filters, leave-one-out split
without leaks), the ranking metrics against hand-computed rankings, the baselines on a
hand-made data set, bad input, the /recommend request checks, and a tiny train -> evaluate ->
predict run of each model in-process."""

import logging
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel import config
from bigmodel.config import DataConfig
from bigmodel.data import recsys as R
from bigmodel.data.sources import DataError
from bigmodel.evaluation import recsys as E
from bigmodel.infer import recommend
from bigmodel.infer.serve import RequestError
from bigmodel.objectives import recsys as O

RECIPES = os.path.join(os.path.dirname(__file__), "..", "experiments", "recsys")


def _write(path, rows, header=("user", "item", "ts")):
  path.write_text("\n".join(["\t".join(header)] + ["\t".join(map(str, r)) for r in rows]) + "\n")
  return str(path)


def _rc(**kw):
  base = dict(user_column="user", item_column="item", time_column="ts", min_user_count=1,
              min_item_count=1)
  return R.RecsysConfig(**{**base, **kw})


def _synthetic(path, users=24, items=12, length=9, seed=0):
  """Each user walks the catalogue from a random start, one step a time (next item = +1):
  a sequence model learns it, popularity cannot."""
  rng = np.random.default_rng(seed)
  rows = []
  for u in range(users):
    start = int(rng.integers(items))
    for t in range(length):
      rows.append((f"u{u}", f"m{(start + t) % items}", 1000 + t))
  rng.shuffle(rows)
  return _write(path, rows)


# ----------------------------------------------------------------------------- the pipeline


def test_sort_filter_and_split_have_no_leaks(tmp_path):
  rows = [("a", "x", 3), ("a", "y", 1), ("a", "z", 2), ("a", "w", 2), ("a", "v", 5),   # ties: file order
          ("b", "x", 1), ("b", "y", 2), ("b", "z", 3), ("b", "w", 4),
          ("c", "x", 1), ("c", "rare", 2), ("c", "y", 3)]                            # c falls below 3
  path = _write(tmp_path / "h.tsv", rows)
  rc = _rc(min_item_count=2, min_user_count=3)
  users, seqs, dropped = R.user_sequences(R.read_interactions(path, rc), rc, path)
  assert users == ["a", "b"] and seqs[0] == ["y", "z", "w", "x"] and seqs[1] == ["x", "y", "z", "w"]
  # 'rare' and 'v' fall below 2; then c, left with 2 items, below 3
  assert dropped["items_min_count"] == 2 and dropped["users_min_count"] == 1
  data = R.RecsysData.build(DataConfig(files=[path], seq_len=4), cloze=True, rc=rc)
  for u, s in enumerate(data.data.seqs):
    train = list(data.data.train_seq(u))
    hist_v, tgt_v = data.data.split("validation")
    hist_t, tgt_t = data.data.split("test")
    assert train == list(s[:-2]) and tgt_v[u] == s[-2] and tgt_t[u] == s[-1]
    assert list(hist_v[u]) == train and list(hist_t[u]) == list(s[:-1])
  # the training rows hold exactly the training items: no validation or test target
  got = sorted(data.train[data.train != R.PAD].tolist())
  want = sorted(i for u in range(len(users)) for i in data.data.train_seq(u))
  assert got == want
  # an evaluation row ends with the mask (cloze) after the history, never the target
  assert data.val.inputs[0, -1] == R.MASK and data.val.inputs[0, -2] == data.data.train_seq(0)[-1]


def test_causal_rows_shift_by_one_and_batches_are_pure_functions_of_the_step(tmp_path):
  path = _synthetic(tmp_path / "s.tsv", users=6, items=8, length=12)
  data = R.RecsysData.build(DataConfig(files=[path], seq_len=4, seed=3), rc=_rc())
  rows = data.train_rows(np.arange(10))
  w = rows["weights"] > 0
  assert np.all(rows["inputs"][:, 1:][w[:, :-1]] == rows["targets"][:, :-1][w[:, :-1]])
  assert np.all(rows["targets"][~w] == R.PAD)
  again = R.RecsysData.build(DataConfig(files=[path], seq_len=4, seed=3), rc=_rc())
  for k in rows:
    np.testing.assert_array_equal(rows[k], again.train_rows(np.arange(10))[k])
  cloze = R.RecsysData.build(DataConfig(files=[path], seq_len=4, seed=3), cloze=True, rc=_rc())
  a, b = cloze.train_rows(np.arange(5, 9)), cloze.train_rows(np.arange(5, 9))
  np.testing.assert_array_equal(a["inputs"], b["inputs"])
  masked = a["inputs"][np.arange(4)[:, None], a["positions"]][a["weights"] > 0]
  assert np.all(masked == R.MASK) and np.all(a["targets"][a["weights"] > 0] >= R.FIRST_ITEM)


def test_window_stride_overlaps_training_windows_and_keeps_targets_out(tmp_path):
  """DataConfig.window_stride: windows end at the newest training item and then every
  `stride` items back (BERT4Rec's sliding window); 0 keeps seq_len (no overlap)."""
  path = _synthetic(tmp_path / "s.tsv", users=3, items=8, length=12)   # 10 training items each
  plain = R.RecsysData.build(DataConfig(files=[path], seq_len=4), cloze=True, rc=_rc())
  slid = R.RecsysData.build(DataConfig(files=[path], seq_len=4, window_stride=3), cloze=True,
                            rc=_rc())
  causal = R.RecsysData.build(DataConfig(files=[path], seq_len=4, window_stride=1), rc=_rc())
  want_plain, want_slid, want_causal = [], [], []
  for u in range(3):
    t = list(plain.data.train_seq(u))
    assert len(t) == 10
    want_plain += [R.right_align(t[max(0, e - 4):e], 4) for e in (10, 6, 2)]
    want_slid += [R.right_align(t[max(0, e - 4):e], 4) for e in (10, 7, 4, 1)]
    want_causal += [R.right_align(t[max(0, e - 5):e], 5) for e in range(10, 1, -1)]
  np.testing.assert_array_equal(plain.train, np.stack(want_plain))
  np.testing.assert_array_equal(slid.train, np.stack(want_slid))
  np.testing.assert_array_equal(causal.train, np.stack(want_causal))
  with pytest.raises(config.ConfigError, match="window_stride=-2"):    # LM rows too: the config
    DataConfig(files=[path], seq_len=4, window_stride=-2)


# ----------------------------------------------------------------------------- metrics


def test_ranks_and_metrics_match_hand_computed_rankings():
  #            pad  mask  2    3    4    5    6 (past the catalogue)
  scores = jnp.array([[9.0, 9.0, 0.5, 0.9, 0.1, 0.7, 5.0],
                      [0.0, 0.0, 0.3, 0.3, 0.3, 0.1, 0.0],
                      [0.0, 0.0, 0.1, 0.2, 0.3, 0.4, 0.0]])
  target = jnp.array([2, 3, 2])
  exclude = jnp.array([[3, 0], [0, 0], [2, 4]])       # the target itself is never excluded
  rank = E._ranks(scores, target, exclude, jnp.array([6, 6, 6]))       # jitted: one compile
  # row 0: 3 is seen, only 5 (0.7) beats 0.5 -> rank 1; row 1: tie with 2 (smaller id) -> 1;
  # row 2: 3 and 5 score higher (4 is seen) -> 2
  assert rank.tolist() == [1, 1, 2]
  m = E._metrics(rank, jnp.array([1.0, 1.0, 0.0]), 2)
  assert float(m["weight"]) == 2 and float(m["hr_sum"]) == 2
  assert math.isclose(float(m["ndcg_sum"]), 2 / math.log2(3), rel_tol=1e-6)
  assert math.isclose(float(m["rr_sum"]), 1.0, rel_tol=1e-6)
  out = O.summarize({k: float(v) for k, v in E._metrics(rank, jnp.ones(3), 1).items()}, 1)
  assert out["hr_1"] == 0 and math.isclose(out["mrr"], (0.5 + 0.5 + 1 / 3) / 3, rel_tol=1e-6)


def test_baselines_on_a_hand_made_data_set():
  # ids 2..5; three users' histories
  hist = [[2, 3], [2, 4], [3, 2, 5]]
  pop = E.popular_scores(hist, 6)
  assert pop.tolist() == [0, 0, 3, 2, 1, 1]
  sim = E.item_similarity(hist, 6)
  # items 2 and 3 share users 0 and 2: 2 / sqrt(3 * 2); 4 and 5 share none
  assert math.isclose(sim[2, 3], 2 / math.sqrt(6), rel_tol=1e-6) and sim[4, 5] == 0
  assert sim[2, 2] == 0 and np.allclose(sim, sim.T)
  table = R.eval_table(["a", "b", "c"], hist, [4, 3, 4], 4, cloze=False)
  popular = E.ranking_metrics(E.baseline_scores("popular", hist, 6), table, 6, cutoff=1)
  # user a: 2, 3 seen; 4 and 5 tie at 1 -> 4 first (smaller id): rank 0
  # user b: 2, 4 seen; 3 (2) beats 5 (1): rank 0.  user c: 2, 3, 5 seen: 4 ranks 0
  assert popular["hr_1"] == 1.0 and popular["mrr"] == 1.0
  knn = E.ranking_metrics(E.baseline_scores("itemknn", hist, 6), table, 6, cutoff=1)
  # user a: score(4) = sim(2,4) + sim(3,4) = 1/sqrt(3); score(5) = sim(2,5) + sim(3,5) > it
  s5 = 1 / math.sqrt(3) + 1 / math.sqrt(2)
  assert s5 > 1 / math.sqrt(3) and knn["hr_1"] == pytest.approx(2 / 3)
  neighbours = E.item_similarity(hist, 6, neighbors=1)
  assert (neighbours > 0).sum(axis=1).max() <= 2          # ties at the cut keep both


# ----------------------------------------------------------------------------- bad input


def test_bad_input_errors_and_counted_drops(tmp_path, caplog):
  path = _write(tmp_path / "h.tsv", [("a", "x", 1)])
  with pytest.raises(DataError, match=r"no column 'timestamp'.*\['user', 'item', 'ts'\]"):
    R.read_interactions(path, _rc(time_column="timestamp"))
  bad = _write(tmp_path / "bad.tsv", [("a", "x", 1), ("a", "y", "yesterday")])
  with pytest.raises(DataError, match=r"row 2: 'ts' is 'yesterday', not a number"):
    R.read_interactions(bad, _rc())
  iso = _write(tmp_path / "iso.tsv", [("a", "x", "2020-01-02T00:00:00Z"), ("a", "y", "2020-01-01")])
  assert [r[1] for r in sorted(R.read_interactions(iso, _rc()), key=lambda r: r[2])] == ["y", "x"]
  short = _write(tmp_path / "short.tsv", [("a", "x", 1), ("a", "y", 2), ("a", "z", 3),
                                         ("b", "x", 1), ("b", "y", 2)])
  with caplog.at_level(logging.WARNING):
    users, _, dropped = R.user_sequences(R.read_interactions(short, _rc()), _rc(), short)
  assert users == ["a"] and dropped["users_short"] == 1
  assert "1 users with fewer than 3 interactions" in caplog.text
  with pytest.raises(DataError, match="MIN_USER_COUNT=5"):
    R.user_sequences(R.read_interactions(short, _rc()), _rc(min_user_count=5), short)


def test_recommend_requests_are_checked_like_generate():
  ok = recommend.parse_recommend(b'{"history": [50, "181"], "top_k": 3}', 8, 100, 10)
  assert ok == {"histories": [["50", "181"]], "top_k": 3}
  for body, msg in [(b"{", "not valid JSON"), (b"[]", "JSON object"),
                    (b'{"history": [1], "k": 2}', "unknown field"),
                    (b'{"history": [1], "histories": [[1]]}', "exactly one"),
                    (b'{"history": []}', "non-empty list"), (b'{"history": [1.5]}', "strings or integers"),
                    (b'{"history": [1], "top_k": 0}', "out of range"),
                    (b'{"histories": [[1], [2], [3]]}', "at most 2")]:
    with pytest.raises(RequestError, match=msg):
      recommend.parse_recommend(body, 2, 100, 10)


def test_recommend_route_names_unknown_items_and_still_answers():
  from fastapi.testclient import TestClient
  from bigmodel.infer import api

  class Fake:
    step, rc = 7, R.RecsysConfig()
    vocab = R.ItemVocab(["a", "b", "c"])

    def recommend(self, history, k):
      unknown = [i for i in history if self.vocab.id(i) is None]
      return {"items": [{"item": "c", "title": None, "score": 1.0}][:k], "unknown_items": unknown}

  client = TestClient(api.make_recommend_app(Fake()))
  r = client.post("/recommend", json={"history": ["a", "zz"], "top_k": 1})
  assert r.status_code == 200 and r.json()["recommendations"][0]["unknown_items"] == ["zz"]
  bad = client.post("/recommend", json={"history": "a"})
  assert bad.status_code == 400 and "non-empty list" in bad.json()["error"]
  assert client.get("/health").json()["items"] == 3


# ----------------------------------------------------------------------------- end to end


def _tiny_exp(tmp_path, objective, steps, extra=()):
  path = _synthetic(tmp_path / "walks.tsv", users=32, items=40, length=10)
  titles = tmp_path / "titles.csv"
  titles.write_text("item_id,title\nm1,One\nm2,Two\n")
  recipe = os.path.join(RECIPES, f"movielens100k_{objective}.gin")
  return config.load([recipe], [
      f"TRAIN_FILE='{path}'", "COLUMN_NAMES=[]", "FILE_FORMAT=''", "USER_COLUMN='user'",
      "ITEM_COLUMN='item'", "TIME_COLUMN='ts'", "RATING_COLUMN=''", f"TITLES_FILE='{titles}'",
      "MIN_USER_COUNT=1", "MIN_ITEM_COUNT=1", "NUM_ITEMS=48", f"TRAIN_STEPS={steps}",
      "BATCH_SIZE=16", "SEQ_LEN=8", "EVAL_EVERY=0", "ModelConfig.d_model=32",
      "ModelConfig.num_layers=1", "ModelConfig.dropout=0.0", "OptimConfig.learning_rate=1e-2",
      "OptimConfig.warmup_steps=5", "TrainConfig.log_every=1000", *extra])


@pytest.mark.slow
def test_sasrec_train_evaluate_predict_in_process(tmp_path):
  """SASRec end to end (the evaluate / predict code is shared with BERT4Rec, whose own paths,
  the cloze rows and the mask-appended scorer, are checked below)."""
  from bigmodel.evaluation import tasks
  from bigmodel.train import loop
  exp = _tiny_exp(tmp_path, "sasrec", 60, ["MeshConfig.tensor=2"])   # the catalogue splits in 2
  R.operative(exp)          # as the CLI does: RecsysConfig joins config.gin
  work = str(tmp_path / "run")
  loop.train(exp, work, config.operative_config())
  saved = open(os.path.join(work, "config.gin")).read()
  assert "RecsysConfig.user_column = %USER_COLUMN" in saved and "USER_COLUMN = 'user'" in saved
  result = tasks.evaluate(work, exp)
  test, pop = result["test"], result["baselines"]["popular"]["test"]
  # the walk is learnable: the model ranks the next step first far more often than popularity
  assert test["ndcg_10"] > 2 * pop["ndcg_10"] and test["hr_10"] > 0.9, result
  req = tmp_path / "users.jsonl"
  # a walk's last steps (it wraps from m39 to m0), an unknown id, a known user, nothing known
  req.write_text('{"history": ["m37", "m38", "m39", "m0", "nope"]}\n{"user": "u3"}\n'
                 '{"history": ["nope"]}\n')
  rows = tasks.predict(work, exp, str(req))
  assert rows[0]["unknown_items"] == ["nope"] and rows[0]["items"][0]["item"] == "m1"
  assert rows[0]["items"][0]["title"] == "One" and len(rows[0]["items"]) == 10
  assert rows[1]["user"] == "u3" and len(rows[1]["items"]) == 10
  assert "error" in rows[2] and rows[2]["unknown_items"] == ["nope"]
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"history": "m1"}\n')
  with pytest.raises(DataError, match=r"request 1: \"history\" must be a list"):
    tasks.predict(work, exp, str(bad))


def test_cloze_rows_mask_the_newest_item_at_last_mask_probability(tmp_path):
  path = _synthetic(tmp_path / "s.tsv", users=6, items=8, length=12)
  cfg = DataConfig(files=[path], seq_len=6, seed=1)
  data = R.RecsysData.build(cfg, cloze=True, rc=_rc(mask_probability=0.5,
                                                   last_mask_probability=0.5))
  rows = data.train_rows(np.arange(400))
  n = (rows["weights"] > 0).sum(axis=1)
  last = (n == 1) & (rows["positions"][:, 0] == 5) & (rows["inputs"][:, 5] == R.MASK)
  # half the rows mask only the newest item; the others (2+ real items) mask half of theirs
  assert 0.4 < last.mean() < 0.6 and np.all(n[~last] >= 2)
  assert np.all(rows["inputs"][last][:, :5] != R.MASK)
  assert np.all(data.train_rows(np.arange(400))["inputs"] == rows["inputs"])
  with pytest.raises(DataError, match="last_mask_probability"):
    _rc(last_mask_probability=1.5)


@pytest.mark.slow
def test_bert4rec_learns_the_next_item_at_the_appended_mask(tmp_path):
  """BERT4Rec's own paths (the train / evaluate / predict loop is SASRec's test): Cloze rows ->
  the `bert4rec` loss, a few Adam steps on one device -> the mask-appended scorer ranks a walk's
  next item first, and the objective's evaluation batches give the same metrics."""
  import jax
  import optax
  from bigmodel import models
  exp = _tiny_exp(tmp_path, "bert4rec", 1, ["RecsysConfig.mask_probability=0.3",
                                            "RecsysConfig.last_mask_probability=0.3"])
  data = O.build_bert4rec_data(exp.data)
  model = models.build("item_encoder", exp.model)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), *O.bert4rec_model_args(
      data.train_rows(np.arange(16))))["params"]
  tx = optax.adam(1e-2)

  @jax.jit
  def step(params, opt, batch):
    def loss(p):
      total, m = O.bert4rec_loss(model, p, batch)
      return total / m["weight"]
    g = jax.grad(loss)(params)
    updates, opt = tx.update(g, opt, params)
    return optax.apply_updates(params, updates), opt

  opt = tx.init(params)
  for k in range(150):
    params, opt = step(params, opt, data.train_rows(np.arange(16 * k, 16 * k + 16)))
  v = data.tokenizer.vocab_size
  scores = jax.jit(lambda p, x: O.bert4rec_scores(model, p, x))
  assert np.all(data.val.inputs[:, -1] == R.MASK)
  out = E.ranking_metrics(lambda users: scores(params, data.val.inputs[users]), data.val, v, 10)
  pop = E.ranking_metrics(E.baseline_scores("popular", data.data.split("validation")[0], v),
                          data.val, v, 10)
  assert out["ndcg_10"] > 2 * pop["ndcg_10"] and out["hr_10"] > 0.75, (out, pop)
  _, sums = jax.jit(lambda p, b: O.bert4rec_loss(model, p, b))(
      params, data.eval_rows(np.arange(len(data.val))))
  same = O.summarize({k: float(x) for k, x in sums.items()})
  assert same["ndcg_10"] == pytest.approx(out["ndcg_10"], rel=1e-5)
  walk = data.tokenizer.encode(["m37", "m38", "m39", "m0"])
  best = np.argmax(np.asarray(scores(params, R.eval_table([""], [walk], [0], 8, True).inputs))[0])
  assert data.tokenizer.item(int(best)) == "m1"


# ----------------------------------------------------------------------------- TFDS


def test_tfds_movielens_source_with_mock_data():
  """The recipes' TFDS branch (TRAIN_FILE='' -> movielens/100k-ratings) through the reader, the
  filters and the split, on mocked TFDS examples in the dataset's own feature names."""
  import tensorflow as tf
  import tensorflow_datasets as tfds
  # user u walks items u, u+1, ..; user_rating 1 drops an interaction at MIN_RATING=2
  events = [(f"{u}", f"{u + t}", 1000 + 10 * t - u, 1.0 if t == 2 else 4.0)
            for u in range(1, 5) for t in range(6)]

  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    del decoders, read_config, kwargs
    assert str(split) == "train"
    return tf.data.Dataset.from_generator(
        lambda: ({"user_id": u, "movie_id": m, "timestamp": np.int64(t),
                  "user_rating": np.float32(r)} for u, m, t, r in events),
        output_signature={"user_id": tf.TensorSpec((), tf.string),
                          "movie_id": tf.TensorSpec((), tf.string),
                          "timestamp": tf.TensorSpec((), tf.int64),
                          "user_rating": tf.TensorSpec((), tf.float32)})

  exp = config.load([os.path.join(RECIPES, "movielens100k_sasrec.gin")], [
      "TRAIN_FILE=''", "ITEM_COLUMN='movie_id'", "RATING_COLUMN='user_rating'", "MIN_RATING=2",
      "MIN_USER_COUNT=1", "MIN_ITEM_COUNT=1", "SEQ_LEN=4", "TITLES_FILE=''"])
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    data = O.build_sasrec_data(exp.data)
  assert data.data.source == "tfds:movielens/100k-ratings:train"
  assert data.data.users == ["1", "2", "3", "4"]
  for u, seq in zip(data.data.users, data.data.seqs):
    want = [str(int(u) + t) for t in (0, 1, 3, 4, 5)]          # time order, t=2 rated 1
    assert data.tokenizer.decode(seq) == want
  hist, target = data.data.split("test")
  assert data.tokenizer.decode(target) == ["6", "7", "8", "9"]
  assert data.tokenizer.decode(data.val.target) == ["5", "6", "7", "8"]
