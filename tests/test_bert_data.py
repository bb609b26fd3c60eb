"""BERT pretraining data: masking statistics, next-sentence pairs, determinism and resume."""

import dataclasses
import functools

import numpy as np
import pytest

from bigmodel.config import task_config
from bigmodel.objectives.bert import MlmConfig
from bigmodel.data import bert, lm
from bigmodel.data.sources import DataError

V = 1000
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4

mlm_cfg = functools.partial(task_config, MlmConfig)   # DataConfig and MlmConfig fields


def _vocab(word_start=None):
  special = np.zeros(V, bool)
  special[[PAD, UNK, CLS, SEP, MASK]] = True
  return bert.BertVocab(size=V, pad=PAD, unk=UNK, cls=CLS, sep=SEP, mask=MASK, special=special,
                        random_ids=np.arange(5, V, dtype=np.int32),
                        word_start=np.ones(V, bool) if word_start is None else word_start)


def _row(rng, n_a, n_b):
  return np.concatenate([[CLS], rng.integers(5, V, n_a), [SEP], rng.integers(5, V, n_b), [SEP]]).astype(np.int32)


def test_masking_statistics():
  vocab, rng = _vocab(), np.random.default_rng(0)
  total = masked = as_mask = unchanged = randomized = 0
  for i in range(3000):
    n_a = int(rng.integers(20, 70))
    row = _row(rng, n_a, 125 - n_a)                       # 128 tokens
    out, pos, labels = bert.mask_row(row, vocab, rng, probability=0.15, max_predictions=20)
    assert len(pos) == min(20, max(1, round(len(row) * 0.15)))   # num_to_predict
    assert np.all(np.diff(pos) > 0)                        # sorted, distinct
    np.testing.assert_array_equal(labels, row[pos])
    assert not vocab.special[row[pos]].any()               # never [CLS] / [SEP] / [PAD]
    specials = vocab.special[row]
    np.testing.assert_array_equal(out[specials], row[specials])
    untouched = np.setdiff1d(np.arange(len(row)), pos)
    np.testing.assert_array_equal(out[untouched], row[untouched])
    total += len(row)
    masked += len(pos)
    as_mask += int((out[pos] == MASK).sum())
    unchanged += int((out[pos] == row[pos]).sum())
    randomized += int(((out[pos] != MASK) & (out[pos] != row[pos])).sum())
  assert abs(masked / total - 0.15) < 0.005
  assert abs(as_mask / masked - 0.8) < 0.01
  assert abs(unchanged / masked - 0.1) < 0.01
  assert abs(randomized / masked - 0.1) < 0.01


def test_short_rows_and_cap():
  vocab, rng = _vocab(), np.random.default_rng(1)
  row = _row(rng, 1, 1)                                     # 5 tokens: round(0.75) = 1
  _, pos, _ = bert.mask_row(row, vocab, rng, probability=0.15, max_predictions=20)
  assert len(pos) == 1 and pos[0] in (1, 3)
  row = _row(rng, 200, 300)                                 # 503 tokens: capped at 20
  _, pos, _ = bert.mask_row(row, vocab, rng, probability=0.15, max_predictions=20)
  assert len(pos) == 20
  assert bert.prediction_slots(128) == 20 and bert.prediction_slots(512) == 80


def test_whole_word_masking_keeps_words_whole():
  word_start = np.zeros(V, bool)
  word_start[5:500] = True                                  # 500..999 continue a word ("##x")
  vocab, rng = _vocab(word_start), np.random.default_rng(2)
  for _ in range(300):
    body = []
    while len(body) < 120:
      body += [int(rng.integers(5, 500))] + list(rng.integers(500, V, int(rng.integers(0, 3))))
    row = np.array([CLS] + body[:60] + [SEP] + body[60:120] + [SEP], np.int32)
    _, pos, _ = bert.mask_row(row, vocab, rng, probability=0.15, max_predictions=20,
                              whole_word=True)
    assert 0 < len(pos) <= 20
    chosen = set(pos.tolist())
    for i in range(1, len(row)):                            # a continuation goes with its word
      if not vocab.special[row[i]] and not word_start[row[i]] and not vocab.special[row[i - 1]]:
        assert (i in chosen) == (i - 1 in chosen), (row, pos)


def _documents(n_docs=30, seed=0, max_sentence=40, sentences=(1, 25)):
  """Document d, sentence j: tokens 10_000*d + 100*j + t, so each token names its place."""
  rng = np.random.default_rng(seed)
  docs = []
  for d in range(n_docs):
    n_sent = int(rng.integers(*sentences))
    docs.append([np.arange(10_000 * d + 100 * j,
                           10_000 * d + 100 * j + int(rng.integers(3, max_sentence)),
                           dtype=np.int32) for j in range(n_sent)])
  return docs


def _flat_doc(doc):
  return np.concatenate(doc)


def _is_contiguous_in(part, doc):
  flat = _flat_doc(doc)
  start = np.flatnonzero(flat == part[0])
  return len(start) == 1 and np.array_equal(flat[start[0]:start[0] + len(part)], part)


@pytest.mark.parametrize("seq_len", [32, 128])
def test_pairs_respect_length_documents_and_balance(seq_len):
  # articles of 20-60 sentences of up to a third of seq_len, as WikiText at 128
  docs = _documents(max_sentence=seq_len // 3, sentences=(20, 60))
  rng = np.random.default_rng(3)
  pairs = []
  for _ in range(10):
    for d in range(len(docs)):
      pairs.extend(bert.create_pairs_from_document(docs, d, seq_len, 0.1, rng))
  labels = np.array([p.is_random_next for p in pairs])
  # 50% random next, plus google-research/bert's forced random next for a one-sentence
  # chunk (a document's last sentence, or one that fills the target alone): ~53-56%
  assert 0.48 < labels.mean() < 0.58, labels.mean()
  for p in pairs:
    a, b = p.tokens_a, p.tokens_b
    assert len(a) >= 1 and len(b) >= 1 and len(a) + len(b) + 3 <= seq_len
    assert np.all(a // 10_000 == p.doc_a)                   # A lies in its document ...
    assert _is_contiguous_in(a, docs[p.doc_a])              # ... as a contiguous span
    assert np.all(b // 10_000 == p.doc_b) and _is_contiguous_in(b, docs[p.doc_b])
    if p.is_random_next:
      assert p.doc_b != p.doc_a                             # never A's own document
    else:
      assert p.doc_b == p.doc_a                             # B continues A, within the document
      flat = _flat_doc(docs[p.doc_a])
      ia, ib = np.flatnonzero(flat == a[-1])[0], np.flatnonzero(flat == b[0])[0]
      assert ib > ia
      if len(a) + len(b) < seq_len - 3:                     # not truncated: B starts where A ends,
        assert ib == ia + 1 and b[0] % 100 == 0             # at a sentence boundary


def test_pairs_short_seq_prob_and_truncation():
  docs = _documents(seed=1)
  rng = np.random.default_rng(4)
  long_doc = [[np.arange(10_000 * i, 10_000 * i + 500, dtype=np.int32)] for i in range(3)]
  for p in bert.create_pairs_from_document(long_doc, 0, 64, 0.0, rng):
    assert len(p.tokens_a) + len(p.tokens_b) == 61          # one 500-token sentence, truncated
  lengths = []
  for _ in range(20):
    for d in range(len(docs)):
      lengths += [len(p.tokens_a) + len(p.tokens_b)
                  for p in bert.create_pairs_from_document(docs, d, 128, 1.0, rng)]
  assert min(lengths) < 30                                  # short targets do happen
  with pytest.raises(DataError, match="at least 2 documents"):
    bert.build_table(docs[:1], _vocab(), 64, 0.1, 1, 0)


def test_split_sentences():
  doc = (" = Robert Boulter = \n Robert Boulter is an English actor . He was born in the U.S. Army "
         "base ! Did he ? \n = = Career = = \n In 2006 , Dr. Smith starred .\n")
  assert bert.split_sentences(doc) == [
      "Robert Boulter is an English actor .", "He was born in the U.S. Army base !", "Did he ?",
      "In 2006 , Dr. Smith starred ."]
  # a tokenized corpus's <unk> marks are dropped (as [UNK] they told which corpus a segment is from)
  assert bert._sentences(" = A = \n The <unk> of <unk> is here . It <unk>\n") == [
      "The of is here .", "It"]


# ------------------------------------------------------------------ the pipeline


@pytest.fixture
def cache(tmp_path, monkeypatch):
  monkeypatch.setenv("BIGMODEL_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def text_corpus(tmp_path):
  """40 documents of 4-12 capitalized sentences, separated by blank lines."""
  return write_corpus(tmp_path / "bert_corpus.txt")


def write_corpus(path, n_docs=40, seed=0):
  import random
  rng = random.Random(seed)
  words = ("the king queen lord lady sword crown castle night day love war peace river "
           "stone horse field city tower ship").split()
  docs = []
  for _ in range(n_docs):
    sents = []
    for _ in range(rng.randint(4, 12)):
      ws = [rng.choice(words) for _ in range(rng.randint(3, 9))]
      sents.append(" ".join([ws[0].capitalize()] + ws[1:]) + " .")
    docs.append(" ".join(sents))
  path.write_text("\n\n".join(docs) + "\n")
  return path


def _cfg(corpus, **kw):
  base = dict(files=[str(corpus)], documents="blank_line", tokenizer="spm:56", seq_len=32,
              dupe_factor=3, eval_batches=3, val_fraction=0.2)
  base.update(kw)
  return mlm_cfg(**base)


def test_pipeline_batches_resume_and_eval_padding(text_corpus, cache):
  data = bert.BertData.build(_cfg(text_corpus))
  assert data.vocab.cls != data.vocab.sep != data.vocab.mask
  ds = list(data.train_batches(8, 0).take(6).as_numpy_iterator())
  b = ds[0]
  assert b["input_ids"].shape == (8, 32) and b["masked_lm_positions"].shape == (8, 8)
  assert (b["input_ids"][:, 0] == data.vocab.cls).all()
  n = b["input_mask"].sum(1)
  assert (b["input_ids"][np.arange(8), n - 1] == data.vocab.sep).all()
  assert (b["input_ids"][b["input_mask"] == 0] == data.vocab.pad).all()
  assert (b["segment_ids"] <= b["input_mask"]).all()
  used = b["masked_lm_weights"] > 0
  assert (np.take_along_axis(b["input_mask"], b["masked_lm_positions"], 1)[used] == 1).all()
  # resume: batches from step 4 equal steps 4, 5 of a run from 0 (this host's rows too)
  resumed = list(data.train_batches(8, 4).take(2).as_numpy_iterator())
  for x, y in zip(resumed, ds[4:6]):
    for k in bert.KEYS:
      np.testing.assert_array_equal(x[k], y[k])
  half = next(data.train_batches(8, 4, host_rows=(4, 4)).as_numpy_iterator())
  np.testing.assert_array_equal(half["input_ids"], ds[4]["input_ids"][4:])
  # eval: in order, the same every time; rows past the end carry zero weight
  ev = list(data.eval_batches(8).as_numpy_iterator())
  assert len(ev) == min(3, -(-len(data.val) // 8))
  w = np.concatenate([e["next_sentence_weights"] for e in ev])
  assert w.sum() == min(len(data.val), 8 * len(ev))
  again = list(data.eval_batches(8).as_numpy_iterator())
  np.testing.assert_array_equal(ev[0]["input_ids"], again[0]["input_ids"])
  assert 0 < data.baselines["mlm_accuracy"] < 1 and 0.5 <= data.baselines["nsp_accuracy"] <= 1


def test_static_and_dynamic_masking(text_corpus, cache):
  static = bert.BertData.build(_cfg(text_corpus, dupe_factor=1))
  dynamic = bert.BertData.build(_cfg(text_corpus, dupe_factor=1, mlm_masking="dynamic"))
  n = len(static.train)
  keys = np.arange(n)
  for data, same in ((static, True), (dynamic, False)):
    # the same table rows in two epochs: identical masks only when static
    e0, e1 = data.train_rows(keys), data.train_rows(keys + n)
    order0 = lm.epoch_permutation(0, 0, n, bert.SHUFFLE_SALT)
    order1 = lm.epoch_permutation(0, 1, n, bert.SHUFFLE_SALT)
    inv1 = np.argsort(order1)[order0]
    equal = np.array_equal(e0["masked_lm_positions"], e1["masked_lm_positions"][inv1])
    assert equal == same
    np.testing.assert_array_equal(e0["input_mask"], e1["input_mask"][inv1])
  # dynamic masks are a pure function of the example index
  np.testing.assert_array_equal(dynamic.train_rows(keys[:5])["input_ids"],
                                dynamic.train_rows(keys[:5])["input_ids"])


def test_bad_settings(text_corpus, cache):
  with pytest.raises(DataError, match="no .CLS./.SEP./.MASK."):
    bert.BertData.build(_cfg(text_corpus, tokenizer="byte"))
  with pytest.raises(DataError, match="mlm_masking"):
    bert.BertData.build(_cfg(text_corpus, mlm_masking="sometimes"))
  with pytest.raises(DataError, match="seq_len"):
    bert.BertData.build(_cfg(text_corpus, seq_len=4))
  data = bert.BertData.build(_cfg(text_corpus, dupe_factor=1))
  with pytest.raises(DataError, match="fewer than one batch"):
    data.train_batches(len(data.train) + 1)
