"""Sequence classification on the GPT decoder (last real token) and on TFDS splits: the
model reads only real tokens, rows are `A (EOS B) EOS`, and a tiny GPT trained with
`bigmodel train` fine-tunes, evaluates and predicts through the CLI."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from bigmodel import cli
from bigmodel.config import ModelConfig, task_config
from bigmodel.objectives.classification import ClassificationConfig
from bigmodel.data import finetune as ft
from bigmodel.data import readers, tokenizers
from bigmodel.data.sources import DataError
from bigmodel.models.decoder import Decoder
from bigmodel.models.heads import DecoderClassifier
from tests import helpers
from tests.test_finetune_classification import _run, _sentiment

RECIPE = os.path.join(os.path.dirname(__file__), "..", "experiments", "finetune", "sst2_gpt_fast.gin")
CFG = ModelConfig(vocab_size=257, d_model=16, num_layers=2, num_heads=2, max_len=16)

cls_cfg = functools.partial(task_config, ClassificationConfig)   # DataConfig and ClassificationConfig fields


def test_decoder_classifier_reads_the_last_real_token_and_shares_the_gpt_tree():
  model = DecoderClassifier(CFG, num_classes=3)
  apply = jax.jit(model.apply)                 # compiled once for its three calls, not op by op
  ids = jnp.array([[5, 6, 7, 256, 0, 0], [9, 256, 0, 0, 0, 0]])
  mask = (jnp.arange(6)[None] < jnp.array([[4], [2]])).astype(jnp.int32)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(0), ids, None, mask)["params"])
  gpt = jax.eval_shape(lambda: Decoder(CFG).init(jax.random.key(0), ids))["params"]
  assert set(params) == set(gpt) | {"classifier"}
  logits = apply({"params": params}, ids, None, mask)
  assert logits.shape == (2, 3)
  # padding after the last real token changes nothing
  np.testing.assert_allclose(apply({"params": params}, ids.at[:, 4:].set(3), None, mask),
                             logits, atol=1e-6)
  # ... and it is the last real token's state: the same as the decoder's hidden state there
  hidden = jax.jit(lambda v, i, m: Decoder(CFG).apply(v, i, None, m, return_hidden=True))(
      {"params": {k: v for k, v in params.items() if k != "classifier"}}, ids, mask)
  want = hidden[jnp.arange(2), jnp.array([3, 1])] @ params["classifier"]["kernel"] \
      + params["classifier"]["bias"]
  np.testing.assert_allclose(logits, want, atol=1e-5)
  # an earlier real token matters (causal attention reaches it)
  assert not np.allclose(apply({"params": params}, ids.at[0, 0].set(8), None, mask)[0],
                         logits[0])


def test_encode_decoder_rows_end_on_eos_and_keep_it_when_truncated():
  tok = tokenizers.ByteTokenizer()
  t = ft.encode(tok, [("ab", "c")], seq_len=6, decoder=True)
  assert list(t.input_ids[0]) == [97, 98, 256, 99, 256, 0] and t.input_mask[0].sum() == 5
  assert t.truncated == 0
  long = ft.encode(tok, [("abcdefghij",)], seq_len=6, decoder=True)
  assert list(long.input_ids[0]) == [97, 98, 99, 100, 101, 256] and long.truncated == 1
  chars = tokenizers.CharTokenizer.fit(["abc"])
  with pytest.raises(DataError, match="joins A and B with EOS"):
    ft.encode(chars, [("a", "b")], seq_len=6, decoder=True)


@pytest.fixture(scope="module")
def tiny_gpt(tmp_path_factory):
  """A tiny byte-level GPT trained for a few steps with `bigmodel train`."""
  tmp = tmp_path_factory.mktemp("gpt")
  corpus = tmp / "corpus.txt"
  corpus.write_text("the dog sat on the mat. the cat sat on the dog.\n\n" * 40)
  work = str(tmp / "work")
  bindings = helpers.tiny_bindings(str(corpus), steps=4, seq=32)
  assert cli.main(["train", "--workdir", work, *helpers.gin_args(bindings)]) == 0
  return work


@pytest.mark.slow
def test_gpt_finetune_evaluate_predict_cli(tiny_gpt, tmp_path, capsys):
  train = _sentiment(tmp_path / "train.tsv", 200, 0)
  dev = _sentiment(tmp_path / "dev.tsv", 40, 1)
  work = str(tmp_path / "run")
  args = ["--gin_file", os.path.join(tiny_gpt, "config.gin"), "--gin_file", RECIPE,
          f"--gin.INIT_CHECKPOINT='{tiny_gpt}'", f"--gin.TRAIN_FILE='{train}'",
          f"--gin.EVAL_FILE='{dev}'"]
  out = _run(capsys, "finetune", *args, "--workdir", work)
  assert "initialized params from" in out and "head params start fresh" in out
  res = json.loads(_run(capsys, "evaluate", "--workdir", work))
  assert res["examples"] == 40 and res["step"] == 150
  assert res["accuracy"] >= 0.9, res           # 'dog' vs 'cat' is learnable in 150 steps
  inp = tmp_path / "in.tsv"
  inp.write_text("sentence\nthe dog sat\na cat is\n")
  preds_path = str(tmp_path / "preds.jsonl")
  _run(capsys, "predict", "--workdir", work, "--input", str(inp), "--out", preds_path)
  assert [json.loads(line)["label"] for line in open(preds_path)] == ["1", "0"]


def test_classification_reads_tfds_splits():
  import tensorflow_datasets as tfds
  assert readers.parse_tfds_spec("tfds:glue/sst2:validation") == ("glue/sst2", "validation")
  with pytest.raises(DataError, match="tfds:NAME:SPLIT"):
    readers.parse_tfds_spec("tfds:glue/sst2")
  assert readers.resolve("tfds:glue/sst2:train", "/data") == "tfds:glue/sst2:train"
  cfg = cls_cfg(files=["tfds:glue/sst2:train"], val_files=["tfds:glue/sst2:validation"],
                   text_columns=["sentence"], label_column="label", labels=["0", "1"], seq_len=16)
  with tfds.testing.mock_data(num_examples=6):
    data = ft.ClassificationData.build(cfg, tokenizers.ByteTokenizer(), decoder=True)
  assert len(data.train) == 6 and len(data.val) == 6
  assert set(data.train.labels) <= {0, 1}
  assert data.train.input_mask.sum(1).min() >= 1
