"""Sequence classification end to end through the CLI: convert a tiny BERT from Hugging Face,
`bigmodel finetune` it on a tiny sentiment TSV (sst2_fast.gin), `evaluate` and `predict`."""

import json
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel import cli
from bigmodel.config import ModelConfig
from bigmodel.data import finetune as ft
from bigmodel.data import hf_tokenizers
from bigmodel.models.heads import EncoderClassifier
from tests import interop_helpers as H
from tests.helpers import run_main as _run

FILLER = "the a is was sat on mat quick brown over lazy".split()
RECIPE = os.path.join(os.path.dirname(__file__), "..", "experiments", "finetune", "sst2_fast.gin")


def _sentiment(path, n, seed):
  """Label 1 iff the sentence holds 'dog' (else 'cat'); filler words otherwise."""
  rng = random.Random(seed)
  lines = ["sentence\tlabel"]
  for _ in range(n):
    label = rng.randint(0, 1)
    words = [rng.choice(FILLER) for _ in range(rng.randint(2, 5))]
    words.insert(rng.randint(0, len(words)), "dog" if label else "cat")
    lines.append(" ".join(words) + " \t" + str(label))
  path.write_text("\n".join(lines) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory):
  return H.converted_bert(tmp_path_factory)   # BertForPreTraining: mlm/nsp heads get dropped


def test_encode_pairs_truncates_and_counts(tiny_init):
  tok = hf_tokenizers.load(tiny_init)
  t = ft.encode(tok, [("dog", "cat"), ("the quick brown fox jumps over", "the lazy dog")], seq_len=8)
  cls, sep = tok.cls_id, tok.sep_id
  assert t.truncated == 1
  assert list(t.input_ids[0, :5]) == [cls, tok.piece_to_id("dog"), sep, tok.piece_to_id("cat"), sep]
  assert list(t.segment_ids[0, :5]) == [0, 0, 0, 1, 1] and t.input_mask[0].sum() == 5
  assert t.input_mask[1].sum() == 8 and t.input_ids[1, -1] == sep


def test_pooling_choices_differ_and_mean_ignores_padding():
  cfg = ModelConfig(vocab_size=40, d_model=16, num_layers=1, num_heads=2, max_len=16, pre_norm=False)
  ids = jnp.array([[2, 5, 6, 3, 0, 0]])
  mask = jnp.array([[1, 1, 1, 1, 0, 0]])
  outs = {}
  for pooling in ("cls", "mean"):
    m = EncoderClassifier(cfg, num_classes=3, pooling=pooling)
    p = jax.jit(m.init)(jax.random.key(0), ids, None, mask)["params"]
    assert set(p) >= {"embed", "blocks", "pooler", "classifier"} and "mlm" not in p
    apply = jax.jit(m.apply)                   # one compile for both calls, not op by op
    outs[pooling] = apply({"params": p}, ids, None, mask)
    assert outs[pooling].shape == (1, 3)
    # padding tokens change nothing
    other = apply({"params": p}, ids.at[0, 4:].set(7), None, mask)
    np.testing.assert_allclose(other, outs[pooling], atol=1e-5)
  assert not np.allclose(outs["cls"], outs["mean"])


@pytest.mark.slow
def test_finetune_evaluate_predict_cli(tiny_init, tmp_path, capsys):
  train = _sentiment(tmp_path / "train.tsv", 200, 0)
  dev = _sentiment(tmp_path / "dev.tsv", 40, 1)
  work = str(tmp_path / "run")
  args = ["--gin_file", os.path.join(tiny_init, "config.gin"), "--gin_file", RECIPE,
          f"--gin.INIT_CHECKPOINT='{tiny_init}'", f"--gin.TRAIN_FILE='{train}'",
          f"--gin.EVAL_FILE='{dev}'", "--gin.ModelConfig.dropout=0.0"]
  out = _run(capsys, "finetune", *args, "--workdir", work)
  assert "initialized params from" in out and "head params start fresh" in out
  summary = json.load(open(os.path.join(work, "summary.json")))
  assert summary["step"] == 150

  res = json.loads(_run(capsys, "evaluate", "--workdir", work))
  assert res["examples"] == 40 and res["step"] == 150
  assert res["accuracy"] >= 0.9, res           # 'dog' vs 'cat' is learnable in 150 steps
  assert 0.0 <= res["macro_f1"] <= 1.0
  assert json.load(open(os.path.join(work, "eval_metrics.json")))["accuracy"] == res["accuracy"]

  inp = tmp_path / "in.jsonl"
  inp.write_text('{"sentence": "the dog sat"}\n{"sentence": "a cat is"}\n')
  preds_path = str(tmp_path / "preds.jsonl")
  _run(capsys, "predict", "--workdir", work, "--input", str(inp), "--out", preds_path)
  preds = [json.loads(line) for line in open(preds_path)]
  assert [p["label"] for p in preds] == ["1", "0"]
  assert all(0.5 <= p["score"] <= 1.0 for p in preds)


def test_finetune_errors_are_clear(tiny_init, tmp_path, capsys):
  train = _sentiment(tmp_path / "train.tsv", 20, 0)
  dev = tmp_path / "dev.tsv"
  dev.write_text("sentence\tlabel\nthe dog\t1\nthe cat\t2\n")
  base = ["finetune", "--gin_file", os.path.join(tiny_init, "config.gin"), "--gin_file", RECIPE,
          f"--gin.INIT_CHECKPOINT='{tiny_init}'", f"--gin.TRAIN_FILE='{train}'",
          "--workdir", str(tmp_path / "w")]
  capsys.readouterr()
  assert cli.main(base + [f"--gin.EVAL_FILE='{dev}'"]) == 2
  assert "row 2 has the label '2'" in capsys.readouterr().err
  assert cli.main(base + [f"--gin.EVAL_FILE='{dev}'", "--gin.LABEL_COLUMN='polarity'"]) == 2
  err = capsys.readouterr().err
  assert "no column 'polarity'" in err and "['sentence', 'label']" in err
