"""Token classification (NER): first-sub-word label alignment, loss masking, the CLI end to
end (convert a tiny BERT, `finetune` on generated CoNLL files with conll2003_fast.gin,
`evaluate`, `predict`), clear errors, and the TFDS `conll2003` path on mock data."""

import functools
import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from flax import linen as nn

from bigmodel import cli
from bigmodel.config import ModelConfig, task_config
from bigmodel.objectives.token_classification import NerConfig
from bigmodel.data import hf_tokenizers, ner, tokenizers
from bigmodel.data.sources import DataError
from bigmodel.evaluation import metrics
from bigmodel.models.tagger import EncoderTagger
from bigmodel.objectives import token_classification as tc
from tests import interop_helpers as H
from tests.helpers import run_main as _run

RECIPE = os.path.join(os.path.dirname(__file__), "..", "experiments", "finetune", "conll2003_fast.gin")
FILLER = "the a is was sat on quick brown over lazy and".split()
# entity mentions (words of the tiny WordPiece vocabulary; 'running' is 'run ##ing')
ENTITIES = {"PER": [["fox"], ["customer", "agent"]], "LOC": [["mat"], ["running", "world"]]}

ner_cfg = functools.partial(task_config, NerConfig)   # DataConfig and NerConfig fields


def _sentences(n, seed, max_filler=5):
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    words = [rng.choice(FILLER) for _ in range(rng.randint(1, max_filler))]
    tags = ["O"] * len(words)
    for _ in range(rng.randint(1, 2)):
      ty = rng.choice(sorted(ENTITIES))
      mention = rng.choice(ENTITIES[ty])
      at = rng.randint(0, len(words))
      words[at:at] = mention
      tags[at:at] = ["B-" + ty] + ["I-" + ty] * (len(mention) - 1)
    out.append((words, tags))
  return out


def _write_conll(path, sentences, docstart=True, final_newline=True):
  """`word POS NER` columns, blank lines between sentences."""
  lines = ["-DOCSTART- -X- O", ""] if docstart else []
  for words, tags in sentences:
    lines += [f"{w} NN {t}" for w, t in zip(words, tags)] + [""]
  text = "\n".join(lines)
  path.write_text(text if final_newline else text.rstrip("\n"))
  return str(path)


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory):
  return H.converted_bert(tmp_path_factory)   # BertForPreTraining: mlm/nsp heads get dropped


# ----------------------------------------------------------------------------- alignment


def test_first_subword_alignment_wordpiece(tiny_init):
  tok = hf_tokenizers.load(tiny_init)
  words = ["The", "runs", "fox", "unbelievable", "."]
  t = ner.encode(tok, [words], seq_len=16, tags=[np.array([0, 1, 2, 3, 0])])
  pieces = [tok.id_to_piece(i) for i in t.input_ids[0, :t.input_mask[0].sum()]]
  assert pieces == ["[CLS]", "the", "run", "##s", "fox", "un", "##believ", "##able", ".", "[SEP]"]
  assert list(t.first[0]) == [1, 2, 4, 5, 8]
  assert list(t.labels[0, :10]) == [-1, 0, 1, -1, 2, 3, -1, -1, 0, -1]
  assert (t.labels[0, 10:] == -1).all() and t.truncated == 0
  # truncation: a word whose first sub-word does not fit is dropped and counted
  t = ner.encode(tok, [words], seq_len=6, tags=[np.array([0, 1, 2, 3, 0])])
  assert list(t.first[0]) == [1, 2, 4] and t.truncated == 1 and t.truncated_words == 2
  assert tok.id_to_piece(int(t.input_ids[0, 5])) == "[SEP]" and t.input_mask[0].sum() == 6
  assert list(t.labels[0]) == [-1, 0, 1, -1, 2, -1]


def test_first_subword_alignment_sentencepiece(tmp_path):
  text = tmp_path / "t.txt"
  text.write_text("\n".join(" ".join(w) for w, _ in _sentences(300, 0)) + "\n")
  path = tokenizers.train_sentencepiece([str(text)], 60, "bpe", str(tmp_path / "sp"),
                                        special_tokens=["[CLS]", "[SEP]", "[MASK]"])
  tok = tokenizers.SentencePieceTokenizer(path)
  words = ["customer", "sat", "running", "zq"]
  t = ner.encode(tok, [words], seq_len=32, tags=[np.array([1, 0, 2, 0])])
  per_word = [tok.encode(w) for w in words]
  assert any(len(p) > 1 for p in per_word)
  expect = [tok.piece_to_id("[CLS]")] + sum(per_word, []) + [tok.piece_to_id("[SEP]")]
  assert list(t.input_ids[0, :len(expect)]) == expect
  starts = np.cumsum([1] + [len(p) for p in per_word[:-1]])
  assert list(t.first[0]) == list(starts)
  lab = np.full(32, -1)
  lab[starts] = [1, 0, 2, 0]
  assert list(t.labels[0]) == list(lab)
  # a tokenizer without [CLS]/[SEP] is refused
  plain = tokenizers.train_sentencepiece([str(text)], 60, "bpe", str(tmp_path / "plain"))
  with pytest.raises(DataError, match=r"\[CLS\]"):
    ner.encode(tokenizers.SentencePieceTokenizer(plain), [words], 32)


def test_tag_helpers_and_input_detection(tmp_path):
  assert ner.iob1_to_iob2(["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-ORG"]) == \
      ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "B-ORG"]
  s = ner.infer_tags([(["a"] * 5, ["I-PER", "O", "B-PER", "B-LOC", "I-LOC"])])
  assert s.names == ("O", "B-LOC", "I-LOC", "B-PER", "I-PER")
  cfg = ner_cfg(tag_column=2)
  conll = _write_conll(tmp_path / "in.txt", _sentences(3, 0), final_newline=False)
  words, gold = ner.read_words(conll, cfg)
  assert len(words) == 3 and [len(g) for g in gold] == [len(w) for w in words]
  plain = tmp_path / "plain.txt"
  plain.write_text("John lives in Paris\nMary works at Google\n\n")
  words, gold = ner.read_words(str(plain), cfg)
  assert words == [["John", "lives", "in", "Paris"], ["Mary", "works", "at", "Google"]] and gold is None


# ----------------------------------------------------------------------------- loss masking


def test_loss_ignores_non_first_subwords_and_padding(tiny_init):
  tok = hf_tokenizers.load(tiny_init)
  cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=16, num_layers=1, num_heads=2, max_len=16,
                    pre_norm=False)
  sents = [["the", "running", "fox", "unbelievable"], ["customer", "agent"]]
  t = ner.encode(tok, sents, 12, [np.array([0, 3, 1, 0]), np.array([1, 2])])
  batch = {k: jnp.asarray(v) for k, v in ner.rows(t, np.arange(2), np.ones(2)).items()}
  model = EncoderTagger(cfg, num_classes=5)
  params = jax.jit(model.init)(jax.random.key(0), *tc.model_args(batch))["params"]
  assert set(params) >= {"embed", "blocks", "tagger"} and "mlm" not in params
  assert nn.unbox(params)["tagger"]["kernel"].shape == (16, 5)

  @jax.jit                                     # compiled once for its four calls, not op by op
  def loss(b):
    return tc.token_classification_loss(model, params, b)

  base, aux = loss(batch)
  assert float(aux["weight"]) == 6.0
  ignored = np.asarray(batch["label_weights"]) == 0          # later sub-words, specials, padding
  assert ignored[0, 3] and ignored[0, 7] and ignored[0, 9] and ignored[1, -1] and not ignored[0, 6]
  rng = np.random.default_rng(0)
  scrambled = np.where(ignored, rng.integers(0, 5, ignored.shape), np.asarray(batch["labels"]))
  same, _ = loss({**batch, "labels": jnp.asarray(scrambled)})
  np.testing.assert_allclose(float(same), float(base), rtol=1e-6)
  # padding tokens change nothing either (attention masks them)
  pad_ids = np.where(np.asarray(batch["input_mask"]) == 0, 7, np.asarray(batch["input_ids"]))
  padded, _ = loss({**batch, "input_ids": jnp.asarray(pad_ids)})
  np.testing.assert_allclose(float(padded), float(base), rtol=1e-5)
  # ...while a label on a first sub-word does
  changed = np.asarray(batch["labels"]).copy()
  changed[0, 2] = (changed[0, 2] + 1) % 5
  other, _ = loss({**batch, "labels": jnp.asarray(changed)})
  assert abs(float(other) - float(base)) > 1e-4


def test_length_buckets_are_a_pure_function_of_the_step(tiny_init, tmp_path):
  train = _write_conll(tmp_path / "train.txt", _sentences(50, 0, max_filler=12))
  dev = _write_conll(tmp_path / "dev.txt", _sentences(9, 1))
  cfg = ner_cfg(files=[train], val_files=[dev], seq_len=32, ner_length_buckets=(8, 16))
  tok = hf_tokenizers.load(tiny_init)
  a, b = ner.NerData.build(cfg, tok), ner.NerData.build(cfg, tok)
  seen = []
  for k in range(13):                     # 50 rows at batch 4: 13 batches an epoch
    idx, width = a.bucket_batch(k, 4)
    idx2, width2 = b.bucket_batch(k, 4)
    assert list(idx) == list(idx2) and width == width2
    longest = a.train.input_mask[idx].sum(-1).max()
    assert width in (8, 16, 32) and longest <= width and (width == 8 or longest > width // 2)
    seen += list(idx)
  assert set(seen) == set(range(50))
  assert list(a.bucket_batch(13, 4)[0]) != list(a.bucket_batch(0, 4)[0])   # a new epoch reshuffles
  batch = next(a.train_batches(4, 5).as_numpy_iterator())
  assert batch["input_ids"].shape[1] == a.bucket_batch(5, 4)[1]
  evals = list(a.eval_batches(4).as_numpy_iterator())
  assert len(evals) == 3 and sum(e["label_weights"].sum() for e in evals) == \
      sum(len(w) for w, _ in ner.read_conll(dev, cfg))


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_finetune_evaluate_predict_cli(tiny_init, tmp_path, capsys):
  train = _write_conll(tmp_path / "train.txt", _sentences(300, 0))
  dev_sents = _sentences(40, 1)
  dev = _write_conll(tmp_path / "dev.txt", dev_sents, final_newline=False)
  work = str(tmp_path / "run")
  args = ["--gin_file", os.path.join(tiny_init, "config.gin"), "--gin_file", RECIPE,
          f"--gin.INIT_CHECKPOINT='{tiny_init}'", f"--gin.TRAIN_FILE='{train}'",
          f"--gin.EVAL_FILE='{dev}'", "--gin.ModelConfig.dropout=0.0", "--gin.NUM_TAGS=5"]
  out = _run(capsys, "finetune", *args, "--workdir", work)
  assert "initialized params from" in out and "head params start fresh" in out and "tagger/kernel" in out
  assert json.load(open(os.path.join(work, "summary.json")))["step"] == 150

  res = json.loads(_run(capsys, "evaluate", "--workdir", work))
  assert res["sentences"] == 40 and res["step"] == 150 and res["truncated_words"] == 0
  assert res["words"] == sum(len(w) for w, _ in dev_sents)
  assert res["f1"] >= 0.8 and res["token_accuracy"] >= 0.9, res     # learnable in 150 steps
  assert set(res["per_type"]) <= {"PER", "LOC"} and res["per_type"]["PER"]["support"] > 0
  assert json.load(open(os.path.join(work, "eval_metrics.json")))["f1"] == res["f1"]

  # predict on the CoNLL dev file: evaluate's F1 is entity_f1 over these predictions
  preds_path = str(tmp_path / "preds.jsonl")
  _run(capsys, "predict", "--workdir", work, "--input", dev, "--out", preds_path)
  preds = [json.loads(line) for line in open(preds_path)]
  assert [p["tokens"] for p in preds] == [w for w, _ in dev_sents]
  assert [p["gold"] for p in preds] == [t for _, t in dev_sents]
  scores = metrics.entity_f1([p["gold"] for p in preds], [p["tags"] for p in preds])
  assert scores["f1"] == pytest.approx(res["f1"]) and scores["per_type"] == res["per_type"]
  flat = [(g, t) for p in preds for g, t in zip(p["gold"], p["tags"])]
  assert res["token_accuracy"] == pytest.approx(sum(g == t for g, t in flat) / len(flat))

  # plain text, one sentence a line; a long one is cut at the row length: its tail is O
  text = tmp_path / "in.txt"
  long = " ".join(["the"] * 30 + ["fox"])
  text.write_text(f"the Fox sat on the mat\n{long}\n")
  _run(capsys, "predict", "--workdir", work, "--input", str(text), "--out", preds_path,
       "--gin.NerConfig.ner_eval_seq_len=16")
  preds = [json.loads(line) for line in open(preds_path)]
  assert preds[0]["tokens"] == "the Fox sat on the mat".split()
  assert preds[0]["tags"] == ["O", "B-PER", "O", "O", "O", "B-LOC"], preds[0]
  assert len(preds[1]["tags"]) == 31 and preds[1]["truncated_words"] == 31 - 14
  assert preds[1]["tags"][14:] == ["O"] * 17

  # evaluate with short rows: dropped words count as O (gold entities there are missed)
  res16 = json.loads(_run(capsys, "evaluate", "--workdir", work, "--gin.NerConfig.ner_eval_seq_len=5"))
  assert res16["truncated_words"] > 0 and res16["words"] == res["words"]
  assert res16["recall"] < res["recall"]


def test_errors_are_clear(tiny_init, tmp_path, capsys):
  train = _write_conll(tmp_path / "train.txt", _sentences(20, 0))
  base = ["finetune", "--gin_file", os.path.join(tiny_init, "config.gin"), "--gin_file", RECIPE,
          f"--gin.INIT_CHECKPOINT='{tiny_init}'", "--workdir", str(tmp_path / "w")]

  def fails(*bindings) -> str:
    capsys.readouterr()
    assert cli.main(base + list(bindings)) == 2
    ckpts = tmp_path / "w" / "checkpoints"
    assert not ckpts.exists() or not any(ckpts.iterdir())       # no checkpoint written
    return capsys.readouterr().err

  dev = _write_conll(tmp_path / "dev.txt", _sentences(5, 1))
  err = fails(f"--gin.TRAIN_FILE='{tmp_path}/nope.txt'", f"--gin.EVAL_FILE='{dev}'")
  assert "nope.txt: no such file" in err
  (tmp_path / "empty.txt").write_text("\n\n")
  err = fails(f"--gin.TRAIN_FILE='{tmp_path}/empty.txt'", f"--gin.EVAL_FILE='{dev}'")
  assert "empty.txt: the file is empty" in err
  err = fails(f"--gin.TRAIN_FILE='{train}'", f"--gin.EVAL_FILE='{dev}'", "--gin.TAG_COLUMN=4")
  assert "train.txt, line 3: 3 columns" in err and "tag column 4" in err and "TAG_COLUMN" in err
  bad = tmp_path / "bad.txt"
  bad.write_text("the NN O\nfox NN B-PER\n\nthe NN O\nmat NN B-ORG\n")
  err = fails(f"--gin.TRAIN_FILE='{train}'", f"--gin.EVAL_FILE='{bad}'")
  assert "bad.txt, line 5: the tag 'B-ORG'" in err and "NerConfig.labels" in err
  err = fails(f"--gin.TRAIN_FILE='{train}'", f"--gin.EVAL_FILE='{dev}'", "--gin.NUM_TAGS=3")
  assert "5 tags but NerConfig.num_classes=3" in err


# ----------------------------------------------------------------------------- TFDS


def _mock_conll2003(sentences, names):
  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    del decoders, read_config, kwargs
    ex = sentences[str(split)]
    return tf.data.Dataset.from_generator(
        lambda: ({"tokens": np.array(w, dtype=object),
                  "ner": np.array([names.index(t) for t in tags], np.int64),
                  "pos": np.zeros(len(w), np.int64), "chunks": np.zeros(len(w), np.int64)}
                 for w, tags in ex),
        output_signature={"tokens": tf.TensorSpec([None], tf.string),
                          "ner": tf.TensorSpec([None], tf.int64),
                          "pos": tf.TensorSpec([None], tf.int64),
                          "chunks": tf.TensorSpec([None], tf.int64)})
  return tfds.testing.mock_data(as_dataset_fn=as_dataset)


def test_tfds_conll2003_with_mock_data(tiny_init):
  names = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
  splits = {"train": _sentences(12, 0), "dev": _sentences(5, 1)}
  cfg = ner_cfg(tfds_name="conll2003", files=[""], val_files=[""], seq_len=24)
  with _mock_conll2003(splits, names):
    data = ner.NerData.build(cfg, hf_tokenizers.load(tiny_init))
  assert data.labels.names == tuple(names)          # the ClassLabel order, not inferred
  assert len(data.train) == 12 and len(data.val) == 5 and data.source == "TFDS conll2003"
  words, tags = splits["train"][3]
  row = data.train.labels[3]
  assert [names[i] for i in row[data.train.first[3]]] == tags
  assert (row >= 0).sum() == len(words)
  assert ner.tag_set(cfg).names == tuple(names)
