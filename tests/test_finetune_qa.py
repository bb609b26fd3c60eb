"""Extractive QA: sliding windows and their labels, n-best span decoding back to the exact
context text, bad input, TFDS (mock data), and `bigmodel finetune` / `evaluate` / `predict`
end to end on a generated SQuAD file from a tiny BERT trunk (xquad_fast.gin)."""

import functools
import json
import logging
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from flax import linen as nn

from bigmodel import cli
from bigmodel.config import ModelConfig, task_config
from bigmodel.objectives.qa import QaConfig
from bigmodel.data import hf_tokenizers
from bigmodel.data import qa
from bigmodel.data.sources import DataError
from bigmodel.evaluation import qa as qa_eval
from bigmodel.models.qa import EncoderSpanExtractor
from tests import interop_helpers as H
from tests.helpers import run_main as _run

RECIPE = os.path.join(os.path.dirname(__file__), "..", "experiments", "finetune", "xquad_fast.gin")
FILLER = "the a is was sat on and or not to of in it this that hello world".split()
# question -> the answer phrase it asks for; both phrases sit in every context
QUESTIONS = {"what jumps ?": "quick brown fox", "who is the agent ?": "lazy cat"}

qa_cfg = functools.partial(task_config, QaConfig)   # DataConfig and QaConfig fields


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("vocab"))
  H.write_wordpiece_vocab(d)
  return hf_tokenizers.load(d)


def _squad(articles: list[list[dict]]) -> dict:
  """[[{"context", "qas": [(question, answer, answer_start)]}...] per article] -> SQuAD JSON."""
  data, n = [], 0
  for a, paragraphs in enumerate(articles):
    ps = []
    for p in paragraphs:
      qas = []
      for question, answer, start in p["qas"]:
        qas.append({"id": f"q{n}", "question": question,
                    "answers": [{"text": answer, "answer_start": start}]})
        n += 1
      ps.append({"context": p["context"], "qas": qas})
    data.append({"title": f"article {a}", "paragraphs": ps})
  return {"version": "1.1", "data": data}


def _generated(n_articles=4, per_article=60, seed=0) -> dict:
  """Contexts of 18-30 filler words holding both answer phrases at random places: 1-3
  windows at seq_len 32 and doc stride 8."""
  rng = random.Random(seed)
  articles = []
  for _ in range(n_articles):
    paragraphs = []
    for _ in range(per_article):
      words = [rng.choice(FILLER) for _ in range(rng.randint(18, 30))]
      phrases = list(QUESTIONS.values())
      rng.shuffle(phrases)
      cut = sorted(rng.sample(range(len(words) + 1), 2))
      words = words[:cut[0]] + [phrases[0]] + words[cut[0]:cut[1]] + [phrases[1]] + words[cut[1]:]
      context = " ".join(words)
      question = rng.choice(list(QUESTIONS))
      answer = QUESTIONS[question]
      paragraphs.append({"context": context, "qas": [(question, answer, context.index(answer))]})
    articles.append(paragraphs)
  return _squad(articles)


def _write(path, obj) -> str:
  path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
  return str(path)


def _record(context, question, answer, start=None, qid="x"):
  start = context.index(answer) if start is None else start
  return {"id": qid, "title": "t", "article": 0, "context": context, "question": question,
          "answers": [answer], "answer_starts": [start], "answer": (start, start + len(answer))}


# ----------------------------------------------------------------------------- windows, labels


def test_windows_cover_the_context_with_the_stride():
  assert qa.windows(5, 11, 4) == [(0, 5)]
  spans = qa.windows(30, 11, 8)
  assert spans == [(0, 11), (8, 11), (16, 11), (24, 6)]
  covered = set()
  for s, n in spans:
    covered |= set(range(s, s + n))
  assert covered == set(range(30))


def test_labels_point_at_the_answer_or_at_cls(tok):
  words = [FILLER[i % len(FILLER)] for i in range(20)]
  context = " ".join(words[:14] + ["quick brown fox"] + words[14:])
  rec = _record(context, "what jumps ?", "quick brown fox")
  f = qa.featurize(tok, [rec], seq_len=20, doc_stride=6, max_query_len=8)
  q_len = len(tok.encode("what jumps ?"))     # 6 pieces: w ##h ##a ##t jumps ?
  assert len(f) == 3                          # 23 context tokens, 11 per window, stride 6
  fox = [tok.piece_to_id(w) for w in ("quick", "brown", "fox")]
  inside = 0
  for i in range(len(f)):
    ids = f.input_ids[i]
    assert ids[0] == tok.cls_id and ids[q_len + 1] == tok.sep_id
    assert list(f.segment_ids[i, :q_len + 2]) == [0] * (q_len + 2)
    n = int(f.input_mask[i].sum())
    assert ids[n - 1] == tok.sep_id and f.segment_ids[i, n - 1] == 1
    window_ids = list(ids[q_len + 2:n - 1])
    has_answer = any(window_ids[k:k + 3] == fox for k in range(len(window_ids)))
    sp, ep = int(f.start_positions[i]), int(f.end_positions[i])
    if has_answer:
      inside += 1
      assert list(ids[sp:ep + 1]) == fox
      a, b = f.token_offsets[i, sp, 0], f.token_offsets[i, ep, 1]
      assert context[a:b] == "quick brown fox"
    else:
      assert sp == ep == 0                     # [CLS]
  assert inside == 2                            # windows 2 and 3 hold it; window 1 does not
  assert (f.start_positions == 0).sum() == 1


def test_question_is_truncated_and_counted(tok):
  rec = _record("the dog sat on the mat", "the " * 20 + "dog ?", "mat")
  f = qa.featurize(tok, [rec], seq_len=24, doc_stride=4, max_query_len=5)
  assert f.truncated_questions == 1
  assert f.input_ids[0, 6] == tok.sep_id and f.segment_ids[0, 7] == 1


# ----------------------------------------------------------------------------- decoding


def _logits_for(f, window, tok_start, tok_end, high=5.0):
  """Start/end logits: low everywhere, `high` at the given token positions of one window."""
  rng = np.random.default_rng(0)
  s = rng.normal(0, 0.1, f.input_ids.shape).astype(np.float32)
  e = rng.normal(0, 0.1, f.input_ids.shape).astype(np.float32)
  s[window, tok_start] = high
  e[window, tok_end] = high
  return s, e


def test_decoding_maps_the_best_span_back_to_the_exact_context_text(tok):
  # accents, case and punctuation: the uncased tokenizer normalizes, offsets do not
  context = ("hello world , this is a test of the café . " * 3 + "Naïve Café, 1,000 dog! "
             + "that was it . " * 4)
  answer = "Naïve Café, 1,000 dog"
  rec = _record(context, "what ?", answer)
  f = qa.featurize(tok, [rec], seq_len=32, doc_stride=6, max_query_len=8)
  assert len(f) > 3
  # every window holding the answer scores it; the decoded text is the context's own string
  hits = [i for i in range(len(f)) if f.start_positions[i] > 0]
  assert hits
  s = np.full(f.input_ids.shape, -5.0, np.float32)
  e = np.full(f.input_ids.shape, -5.0, np.float32)
  for i in hits:
    s[i, f.start_positions[i]] = 4.0
    e[i, f.end_positions[i]] = 4.0
  (best, *_), = qa_eval.decode(f, [rec], s, e, n_best_size=5, max_answer_len=20)
  assert best["text"] == answer
  assert context[best["start"]:best["end"]] == answer and best["start"] == context.index(answer)


def test_answer_only_in_the_second_window_wins_over_a_decoy(tok):
  words = [FILLER[i % len(FILLER)] for i in range(16)]
  context = " ".join(words[:13] + ["lazy cat"] + words[13:])      # 18 tokens
  rec = _record(context, "it ?", "lazy cat")                        # 10 context tokens a window
  f = qa.featurize(tok, [rec], seq_len=15, doc_stride=8, max_query_len=4)
  assert len(f) == 2
  assert f.start_positions[0] == 0 and f.start_positions[1] > 0   # only window 2 holds it
  s, e = _logits_for(f, 1, f.start_positions[1], f.end_positions[1], high=5.0)
  s[0, 6], e[0, 7] = 3.0, 3.0                                        # a weaker decoy in window 1
  best = qa_eval.decode(f, [rec], s, e, n_best_size=4, max_answer_len=5)[0]
  assert best[0]["text"] == "lazy cat" and context[best[0]["start"]:best[0]["end"]] == "lazy cat"
  decoy = context[f.token_offsets[0, 6, 0]:f.token_offsets[0, 7, 1]]
  assert decoy in [b["text"] for b in best[1:]]
  assert best[0]["probability"] > best[1]["probability"]
  assert abs(sum(b["probability"] for b in best) - 1) < 1e-6
  # the same logits with the decoy stronger: the decoy wins
  s[0, 6], e[0, 7] = 9.0, 9.0
  assert qa_eval.decode(f, [rec], s, e, 4, 5)[0][0]["text"] == decoy


def test_nbest_respects_max_answer_len_and_order(tok):
  context = " ".join(FILLER * 2)
  rec = _record(context, "it ?", FILLER[3])
  f = qa.featurize(tok, [rec], seq_len=48, doc_stride=16, max_query_len=4)
  assert len(f) == 1
  first = 4                                           # [CLS] what ? [SEP]
  s = np.zeros(f.input_ids.shape, np.float32)
  e = np.zeros(f.input_ids.shape, np.float32)
  s[0, first + 30], e[0, first + 25] = 10.0, 10.0     # end before start: invalid (20)
  s[0, first + 1], e[0, first + 16] = 8.0, 8.0        # 16 tokens, over max_answer_len 4 (16)
  s[0, first + 5], e[0, first + 7] = 6.0, 6.0         # the best valid span: 3 tokens (12)
  best = qa_eval.decode(f, [rec], s, e, n_best_size=10, max_answer_len=4)[0]
  words = context.split()
  assert best[0]["text"] == " ".join(words[5:8])
  assert len(best) == 10
  for b in best:
    assert b["start"] < b["end"] and context[b["start"]:b["end"]] == b["text"]
    assert 1 <= len(b["text"].split()) <= 4            # one word per token here
  assert [b["logit"] for b in best] == sorted([b["logit"] for b in best], reverse=True)
  # question and padding positions never answer, even with the highest logits
  s[0, :first], e[0, :first] = 50.0, 50.0
  s[0, 40:], e[0, 40:] = 50.0, 50.0
  assert qa_eval.decode(f, [rec], s, e, 10, 4)[0][0]["text"] == " ".join(words[5:8])
  # a window without context tokens offers no span: no answer
  masked = qa.Features(**{**f.__dict__, "token_offsets": np.full_like(f.token_offsets, -1)})
  assert qa_eval.decode(masked, [rec], s, e, 3, 4) == [[]]


def test_span_model_shapes_and_padding():
  cfg = ModelConfig(vocab_size=40, d_model=16, num_layers=1, num_heads=2, max_len=16, pre_norm=False)
  ids = jnp.array([[2, 5, 6, 3, 7, 3, 0, 0]])
  mask = jnp.array([[1, 1, 1, 1, 1, 1, 0, 0]])
  m = EncoderSpanExtractor(cfg)
  p = nn.unbox(jax.jit(m.init)(jax.random.key(0), ids, None, mask)["params"])
  assert set(p) >= {"embed", "blocks", "qa_outputs"} and "mlm" not in p and "nsp" not in p
  assert p["qa_outputs"]["kernel"].shape == (16, 2)
  apply = jax.jit(m.apply)                     # one compile for both calls, not op by op
  out = apply({"params": p}, ids, None, mask)
  assert out.shape == (1, 8, 2) and out.dtype == jnp.float32
  other = apply({"params": p}, ids.at[0, 6:].set(9), None, mask)
  np.testing.assert_allclose(other[:, :6], out[:, :6], atol=1e-5)


# ----------------------------------------------------------------------------- sources, errors


def test_article_ranges_split_one_file(tmp_path, tok):
  path = _write(tmp_path / "s.json", _generated(n_articles=4, per_article=3))
  cfg = qa_cfg(files=[path], val_files=[""], train_articles="0:3", eval_articles="3:4",
                   seq_len=32, doc_stride=8, max_query_len=12)
  d = qa.QAData.build(cfg, tok)
  assert {r["article"] for r in d.val_records} == {3} and len(d.val_records) == 3
  train, _ = qa.load_records(cfg, "train")
  assert len(train) == 9 and {r["article"] for r in train} == {0, 1, 2}
  batch = next(iter(d.train_batches(4).as_numpy_iterator()))
  assert set(batch) == set(qa.KEYS) and batch["input_ids"].shape == (4, 32)
  again = next(iter(d.train_batches(4).as_numpy_iterator()))
  np.testing.assert_array_equal(batch["input_ids"], again["input_ids"])    # a function of step
  evals = list(d.eval_batches(4).as_numpy_iterator())
  assert sum(b["weights"].sum() for b in evals) == len(d.val)


def test_bad_input_is_a_clear_error(tmp_path, tok, caplog):
  with pytest.raises(DataError, match="no such file"):
    qa.read_file(str(tmp_path / "missing.json"))
  with pytest.raises(DataError, match="empty"):
    qa.read_file(_write(tmp_path / "empty.json", "  \n"))
  with pytest.raises(DataError, match=r"line 3: malformed JSON"):
    qa.read_file(_write(tmp_path / "bad.json", '{"data": [\n {"title": "x",\n  "paragraphs": [}\n]}'))
  with pytest.raises(DataError, match="not SQuAD v1.1"):
    qa.read_file(_write(tmp_path / "list.json", "[1, 2]"))
  with pytest.raises(DataError, match="lacks 'context'"):
    qa.read_file(_write(tmp_path / "noctx.json", '{"data": [{"paragraphs": [{"qas": []}]}]}'))
  good = _generated(n_articles=2, per_article=4)
  path = _write(tmp_path / "s.json", good)
  for spec in ("0:3", "1:1", "x", "2:"):
    cfg = qa_cfg(files=[path], train_articles=spec, seq_len=32)
    with pytest.raises(DataError, match="article|outside"):
      qa.load_records(cfg, "train")
  with pytest.raises(DataError, match=r"'0:3' is outside the 2 articles"):
    qa.load_records(qa_cfg(files=[path], train_articles="0:3"), "train")
  # answer_start that does not match the text: warned, counted, skipped for training
  good["data"][0]["paragraphs"][1]["qas"][0]["answers"][0]["answer_start"] += 1
  good["data"][0]["paragraphs"][2]["qas"][0]["answers"][0]["answer_start"] = 10_000
  path = _write(tmp_path / "off.json", good)
  cfg = qa_cfg(files=[path], train_articles="0:1", eval_articles="1:2", seq_len=32,
                   doc_stride=8, max_query_len=12)
  with caplog.at_level(logging.WARNING, logger="bigmodel.data.qa"):
    d = qa.QAData.build(cfg, tok)
  assert "2 question(s) whose answer_start does not match" in caplog.text
  assert len({int(i) for i in d.train.example_index}) == 2
  with pytest.raises(DataError, match="needs data"):
    qa.load_records(qa_cfg(), "train")
  with pytest.raises(DataError, match="leaves no room"):
    qa.featurize(tok, [_record("the dog", "what is the dog ?", "dog")], 8, 4, 8)


def test_tokenizer_without_cls_sep_is_refused():
  from bigmodel.data.tokenizers import ByteTokenizer
  with pytest.raises(DataError, match=r"\[CLS\] and \[SEP\]"):
    qa.featurize(ByteTokenizer(), [_record("the dog", "q", "dog")], 16, 4, 4)


def test_sentencepiece_offsets_map_back(tmp_path):
  from bigmodel.data import tokenizers
  corpus = tmp_path / "c.txt"
  corpus.write_text("\n".join(["The quick brown fox jumps over the lazy dog. Naïve café!"] * 30))
  model = tokenizers.train_sentencepiece([str(corpus)], 60, "bpe", str(tmp_path / "sp"),
                                         special_tokens=["[CLS]", "[SEP]"])
  sp = tokenizers.SentencePieceTokenizer(model)
  context = "the lazy dog met a Naïve café owner"
  rec = _record(context, "who ?", "Naïve café")
  f = qa.featurize(sp, [rec], seq_len=64, doc_stride=16, max_query_len=8)
  sp_, ep = int(f.start_positions[0]), int(f.end_positions[0])
  assert sp_ > 0 and f.input_ids[0, 0] == sp.piece_to_id("[CLS]")
  s = np.zeros(f.input_ids.shape, np.float32)
  e = np.zeros(f.input_ids.shape, np.float32)
  s[0, sp_], e[0, ep] = 9.0, 9.0
  best = qa_eval.decode(f, [rec], s, e, 3, 30)[0][0]
  assert best["text"] == "Naïve café" and context[best["start"]:best["end"]] == "Naïve café"


def _tfds_fake(records_by_split):
  def as_dataset(self, split, **kwargs):
    recs = records_by_split[str(split)]

    def gen():
      for r in recs:
        yield {"id": r["id"], "title": r["title"], "context": r["context"], "question": r["question"],
               "answers": {"text": r["answers"], "answer_start": np.array(r["answer_starts"], np.int32)}}
    sig = {k: tf.TensorSpec((), tf.string) for k in ("id", "title", "context", "question")}
    sig["answers"] = {"text": tf.TensorSpec((None,), tf.string),
                      "answer_start": tf.TensorSpec((None,), tf.int32)}
    return tf.data.Dataset.from_generator(gen, output_signature=sig)
  return as_dataset


def test_tfds_squad_and_xquad_with_mock_data(tmp_path, tok):
  import tensorflow_datasets as tfds
  path = _write(tmp_path / "s.json", _generated(n_articles=4, per_article=3))
  recs = qa.read_file(path)
  fake = _tfds_fake({"train": recs[:9], "validation": recs[9:], "test": recs})
  with tfds.testing.mock_data(as_dataset_fn=fake):
    d = qa.QAData.build(qa_cfg(files=[""], tfds_name="squad", seq_len=32, doc_stride=8,
                                   max_query_len=12), tok)
    assert len(d.val_records) == 3 and d.val_records[0]["context"] == recs[9]["context"]
    assert len({int(i) for i in d.train.example_index}) == 9
    cfg = qa_cfg(tfds_name="xquad/en", tfds_train_split="test", tfds_eval_split="test",
                     train_articles="0:3", eval_articles="3:4", seq_len=32, doc_stride=8,
                     max_query_len=12)
    d = qa.QAData.build(cfg, tok)
    assert [r["id"] for r in d.val_records] == [r["id"] for r in recs[9:]]
    recs_tfds, _ = qa.load_records(qa_cfg(files=["tfds:xquad/en:test"], train_articles="1:2"),
                                   "train")
    assert [r["question"] for r in recs_tfds] == [r["question"] for r in recs[3:6]]
  # the random examples of plain mock_data: answers never match, so nothing to train on
  with tfds.testing.mock_data(num_examples=4):
    with pytest.raises(DataError, match="no question has an answer"):
      qa.QAData.build(qa_cfg(tfds_name="squad", seq_len=32), tok)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory):
  return H.converted_bert(tmp_path_factory)   # BertForPreTraining: mlm/nsp heads get dropped


@pytest.mark.slow
def test_finetune_evaluate_predict_cli(tiny_init, tmp_path, capsys):
  data = _generated(n_articles=4, per_article=60, seed=1)
  path = _write(tmp_path / "squad.json", data)
  work = str(tmp_path / "run")
  args = ["--gin_file", os.path.join(tiny_init, "config.gin"), "--gin_file", RECIPE,
          f"--gin.INIT_CHECKPOINT='{tiny_init}'", f"--gin.TRAIN_FILE='{path}'",
          "--gin.ModelConfig.dropout=0.0"]
  out = _run(capsys, "finetune", *args, "--workdir", work)
  assert "initialized params from" in out and "qa_outputs" in out
  assert json.load(open(os.path.join(work, "summary.json")))["step"] == 120

  res = json.loads(_run(capsys, "evaluate", "--workdir", work))
  assert res["questions"] == 60 and res["step"] == 120 and res["windows"] > 60
  assert res["exact_match"] >= 80.0 and res["f1"] >= res["exact_match"], res
  assert json.load(open(os.path.join(work, "eval_metrics.json")))["f1"] == res["f1"]

  # predict on a SQuAD file without answers: each answer is an exact substring of its context
  test = _generated(n_articles=1, per_article=6, seed=7)
  for p in test["data"][0]["paragraphs"]:
    for q in p["qas"]:
      del q["answers"]
  inp = _write(tmp_path / "test.json", test)
  preds_path = str(tmp_path / "preds.jsonl")
  _run(capsys, "predict", "--workdir", work, "--input", inp, "--out", preds_path)
  preds = [json.loads(line) for line in open(preds_path)]
  paragraphs = test["data"][0]["paragraphs"]
  assert [p["id"] for p in preds] == [p["qas"][0]["id"] for p in paragraphs]
  right = 0
  for p, para in zip(preds, paragraphs):
    ctx = para["context"]
    assert ctx[p["start"]:p["end"]] == p["text"] and 0 < p["score"] <= 1
    right += p["text"] == QUESTIONS[para["qas"][0]["question"]]
  assert right >= 4, preds

  # errors through the CLI: exit status 2 and a message
  capsys.readouterr()
  assert cli.main(["finetune", *args, "--gin.TRAIN_ARTICLES='0:9'", "--workdir",
                   str(tmp_path / "w2")]) == 2
  assert "outside the 4 articles" in capsys.readouterr().err
  assert cli.main(["evaluate", "--workdir", work, "--eval_file", str(tmp_path / "nope.json")]) == 2
  assert "no such file" in capsys.readouterr().err
