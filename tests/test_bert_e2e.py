"""A tiny BERT pretraining through the CLI, then a phase 2 started from its checkpoint."""

import json
import os
import pathlib
from unittest import mock

import jax
import numpy as np
import pytest

from tests import helpers
from tests.test_bert_data import write_corpus

RECIPE = "experiments/bert_wikitext_mlm_nsp.gin"
PHASE2 = "experiments/bert_wikitext_mlm_nsp_phase2.gin"


def _tiny(corpus, seq, steps):
  return [
      "ModelConfig.vocab_size = 56", "ModelConfig.d_model = 32", "ModelConfig.num_layers = 2",
      "ModelConfig.num_heads = 2", "ModelConfig.d_ff = 64", "ModelConfig.max_len = 64",
      f"DataConfig.files = ['{corpus}']", "DataConfig.documents = 'blank_line'",
      "DataConfig.tokenizer = 'spm:56'", "MlmConfig.dupe_factor = 2", "DataConfig.eval_batches = 2",
      "DataConfig.val_fraction = 0.2",
      f"SEQ_LEN = {seq}", "BATCH_SIZE = 8", f"TRAIN_STEPS = {steps}", "WARMUP_STEPS = 2",
      "EVAL_EVERY = 3", "TrainConfig.log_every = 2", "TrainConfig.peak_flops = 1e11",
      "TrainConfig.async_checkpoints = False",
  ]


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture
def corpus(tmp_path, monkeypatch):
  monkeypatch.setenv("BIGMODEL_CACHE_DIR", str(tmp_path / "cache"))
  return write_corpus(tmp_path / "corpus.txt")


def test_pretrain_then_phase2_from_checkpoint(corpus, tmp_path):
  phase1 = tmp_path / "phase1"
  proc = helpers.cli(["train", f"--gin_file={RECIPE}", f"--workdir={phase1}",
                      *helpers.gin_args(_tiny(corpus, 32, 6))],
                     env_extra={"BIGMODEL_CACHE_DIR": str(tmp_path / "cache")}, devices=2)
  assert "eval step 6: validation loss" in proc.stdout and "mlm_accuracy" in proc.stdout
  assert "baselines on all" in proc.stderr             # the baselines are logged
  records = _records(phase1)
  evals = [r for r in records if r.get("split") == "validation"]
  train = [r for r in records if "split" not in r]
  assert [r["step"] for r in evals] == [3, 6] and [r["step"] for r in train] == [2, 4, 6]
  for r in evals + train:
    for k in ("loss", "mlm_loss", "mlm_accuracy", "nsp_loss", "nsp_accuracy"):
      assert np.isfinite(r[k]), (k, r)
    assert r["loss"] == pytest.approx(r["mlm_loss"] + r["nsp_loss"], rel=1e-6)
  assert (phase1 / "tokenizer.model").exists()
  assert "bert_mlm_nsp" in (phase1 / "config.gin").read_text()

  # Phase 2: longer sequences, params from phase 1 (on another mesh), fresh optimizer and step.
  # What phase 2's first step receives must be phase 1's final params (its last checkpoint).
  from bigmodel import cli, config, sharding
  from bigmodel.train import checkpoint, loop
  phase2 = tmp_path / "phase2"
  bindings = _tiny(corpus, 64, 3) + [f"TrainConfig.init_checkpoint = '{phase1}'"]
  first_state = []
  real_train_step = loop.Components.train_step

  def recording_train_step(self, *args, **kwargs):
    step_fn = real_train_step(self, *args, **kwargs)

    def step(state, batch):
      if not first_state:
        first_state.append(jax.device_get(state))
      return step_fn(state, batch)
    return step
  with mock.patch.object(loop.Components, "train_step", recording_train_step):
    assert cli.main(["train", f"--gin_file={PHASE2}", f"--workdir={phase2}",
                     *helpers.gin_args(bindings)]) == 0
  assert [r["step"] for r in _records(phase2) if r.get("split")] == [3]
  assert (phase2 / "tokenizer.model").read_bytes() == (phase1 / "tokenizer.model").read_bytes()

  exp1 = config.load([RECIPE], _tiny(corpus, 32, 6))
  comp1 = loop.Components.build(exp1, sharding.make_mesh(exp1.mesh))
  ckpt = checkpoint.Checkpointer(str(phase1 / "checkpoints"), async_save=False)
  assert ckpt.latest_step() == 6
  final1, _ = ckpt.restore(6, comp1.abstract)
  ckpt.close()
  (start2,) = first_state
  assert int(start2.step) == 0                              # a fresh step and optimizer state
  assert all(not np.asarray(m).any() for m in jax.tree.leaves(start2.opt_state)
             if np.asarray(m).dtype.kind == "f")
  final1_leaves = jax.tree.leaves(final1.params)
  assert len(jax.tree.leaves(start2.params)) == len(final1_leaves)
  for a, b in zip(jax.tree.leaves(start2.params), final1_leaves):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  exp = config.load([PHASE2], bindings)
  comp = loop.Components.build(exp, sharding.make_mesh(exp.mesh))
  init = comp.init_state(jax.random.key(exp.train.seed)).params   # what a fresh start would use
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(init), final1_leaves))

  bad = _tiny(corpus, 64, 3) + [f"TrainConfig.init_checkpoint = '{tmp_path / 'nowhere'}'"]
  assert cli.main(["train", f"--gin_file={PHASE2}", f"--workdir={tmp_path / 'bad'}",
                   *helpers.gin_args(bad)]) == 2
  other = bindings + ["ModelConfig.d_ff = 96"]
  with pytest.raises(checkpoint.CheckpointError, match="do not match"):
    loop.load_params(str(phase1), loop.Components.build(config.load([PHASE2], other),
                                                        comp.mesh).abstract.params)
