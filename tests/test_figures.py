"""Figures that mean what they say: accuracy under ties, each validation row scored once,
the MFU peak, the host recorded with bench figures, and control tokens in raw text."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel.config import DataConfig, task_config
from bigmodel.objectives.bert import MlmConfig
from bigmodel.data import lm
from bigmodel.objectives import lm as lm_objective

mlm_cfg = functools.partial(task_config, MlmConfig)   # DataConfig and MlmConfig fields


# ---------------------------------------------------------------------------------------
# Accuracy: a hit is the label being the first arg-max, as argmax counts it.

def test_accuracy_counts_only_the_first_of_tied_maxima():
  v = 7
  logits = jnp.zeros((6, v))                               # row 0: all tied
  logits = logits.at[1].set(1.0).at[1, 3].set(2.0)         # row 1: unique max at 3
  logits = logits.at[2, 2].set(5.0).at[2, 5].set(5.0)      # row 2: tie at 2 and 5
  logits = logits.at[3, 2].set(5.0).at[3, 5].set(5.0)
  logits = logits.at[4, 0].set(-1.0)                       # row 4: tie at 1..6
  logits = logits.at[5, 6].set(3.0)
  labels = jnp.array([4, 3, 5, 2, 1, 0])
  losses, hits = lm_objective.softmax_xent(logits, labels)
  np.testing.assert_array_equal(hits, [0, 1, 0, 1, 1, 0])
  np.testing.assert_array_equal(hits, (jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  np.testing.assert_allclose(losses, -jax.nn.log_softmax(logits)[jnp.arange(6), labels], rtol=1e-6)
  # constant logits score 1/V (label 0 only), not 100%
  _, _, correct = lm_objective.cross_entropy(jnp.zeros((2, v, v)), jnp.arange(v)[None].repeat(2, 0),
                                             jnp.ones((2, v)))
  assert float(correct) == 2.0


def test_accuracy_matches_argmax_on_bf16_rounded_logits():
  """bf16 rounding makes ties common; the hit must still be argmax's."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(0, 1, (64, 40, 512)), jnp.bfloat16)   # many tied maxima
  labels = jnp.argmax(logits.astype(jnp.float32) + rng.normal(0, 0.3, (64, 40, 512)), -1)
  tied = jnp.sum(logits == logits.max(-1, keepdims=True), -1) > 1
  assert int(tied.sum()) > 0
  _, hits = jax.jit(lm_objective.softmax_xent)(logits, labels)
  np.testing.assert_array_equal(hits, (jnp.argmax(logits, -1) == labels).astype(jnp.float32))
  # the gradient is the cross entropy's alone
  g = jax.grad(lambda x: jnp.sum(lm_objective.softmax_xent(x, labels)[0]))(logits.astype(jnp.float32))
  want = jax.nn.softmax(logits.astype(jnp.float32)) - jax.nn.one_hot(labels, 512)
  np.testing.assert_allclose(g, want, atol=1e-6)


# ---------------------------------------------------------------------------------------
# LM validation: every row exactly once, the padding of the last batch at weight 0.

@pytest.mark.parametrize("n_rows,batch,hosts", [(10, 4, 1), (12, 4, 1), (7, 8, 1), (10, 4, 2)])
def test_every_validation_row_is_scored_exactly_once(n_rows, batch, hosts):
  seq = 4
  n_tokens = n_rows * seq + 1                              # exactly n_rows windows
  val = lm.TokenStream(np.arange(n_tokens, dtype=np.int32), np.zeros(n_tokens, np.int32))
  data = lm.LMData(DataConfig(seq_len=seq, eval_batches=100), None, val, val, "test")
  assert lm.num_rows(len(val), seq, seq) == n_rows
  weight_of_row = np.zeros(n_rows)
  per_host = batch // hosts
  for h in range(hosts):
    for b in data.eval_batches(batch, (h * per_host, per_host)).as_numpy_iterator():
      rows = b["inputs"][:, 0] // seq
      for r, w in zip(rows, b["weights"]):
        assert set(np.unique(w)) <= {0.0, 1.0}
        weight_of_row[r] += w.sum()
  np.testing.assert_array_equal(weight_of_row, np.full(n_rows, seq))


def test_eval_batches_cut_short_by_eval_batches_keep_full_weight():
  seq, n_rows = 4, 10
  val = lm.TokenStream(np.arange(n_rows * seq + 1, dtype=np.int32), np.zeros(n_rows * seq + 1, np.int32))
  data = lm.LMData(DataConfig(seq_len=seq, eval_batches=2), None, val, val, "test")
  got = list(data.eval_batches(4).as_numpy_iterator())
  assert len(got) == 2 and all(b["weights"].min() == 1.0 for b in got)


# ---------------------------------------------------------------------------------------
# MFU: a peak that holds, never an MFU above 1 in the log.

def test_peak_is_the_best_recorded_for_the_host_and_remeasured_when_exceeded(tmp_path, monkeypatch):
  from bigmodel import flops
  monkeypatch.setenv("BIGMODEL_PEAK_FILE", str(tmp_path / "peaks.json"))
  timings = iter([400e9, 100e9, 120e9, 130e9])                    # quiet, busy, busy, busy
  monkeypatch.setattr(flops, "measure_matmul_peak", lambda **kw: next(timings))
  first = flops.Peak.for_run()
  assert first.flops == 400e9
  second = flops.Peak.for_run()                                     # a busy start: 100 now
  assert second.flops == 400e9 and "100.0 GFLOP/s now" in second.source
  assert "400.0 GFLOP/s is the best recorded" in second.source
  assert second.mfu_fields(200e9) == {"mfu": 0.5, "peak_flops": 400e9}
  # an achieved rate above the peak makes it measure again; still above: no MFU figure
  fields = second.mfu_fields(500e9)
  assert "mfu" not in fields and fields["mfu_above_peak"].startswith("1.250 of 400.0 GFLOP/s")
  configured = flops.Peak.for_run(1e9)
  assert configured.source == "configured" and configured.flops == 1e9
  assert "mfu" not in configured.mfu_fields(2e9)


def test_train_log_names_its_peak_and_never_an_mfu_above_one(capsys, text_corpus, tmp_path):
  import json
  from tests.helpers import gin_args, run_main, tiny_bindings
  bindings = tiny_bindings(text_corpus, steps=3) + ["TrainConfig.peak_flops = 1e3",
                                                    "TrainConfig.sample_len = 0"]
  out = run_main(capsys, "train", f"--workdir={tmp_path}", *gin_args(bindings))
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  timed = [r for r in records if "tokens_per_sec" in r]
  assert timed and all("mfu" not in r and r["peak_flops"] == 1e3 and "mfu_above_peak" in r
                       for r in timed)
  summary = json.load(open(tmp_path / "summary.json"))
  assert summary["mfu"] is None and summary["peak_flops"] == 1e3
  assert summary["peak_flops_source"] == "configured" and "MFU n/a" in out


# ---------------------------------------------------------------------------------------
# Control tokens written in raw text stay text in training data; `encode` keeps HF's way.

INJECT = "the king said [MASK] and [SEP] then [CLS] <|endoftext|> the end"


def test_imported_tokenizers_keep_hf_behaviour_and_encode_training_text_ordinarily(tmp_path):
  import transformers
  from bigmodel.data import hf_tokenizers, tokenizers
  from tests import interop_helpers as H
  H.write_wordpiece_vocab(str(tmp_path / "wp"))
  wp = hf_tokenizers.load(str(tmp_path / "wp"))
  specials = {wp.mask_id, wp.sep_id, wp.cls_id}
  assert specials <= set(wp.encode(INJECT))                       # as transformers does
  ordinary = tokenizers.encode_ordinary(wp, INJECT)
  assert not specials & set(ordinary.tolist())
  wp.save(str(tmp_path / "wp_saved"))
  ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "wp_saved"))
  assert wp.encode(INJECT) == ref(INJECT, add_special_tokens=False)["input_ids"]
  assert ordinary.tolist() == ref(INJECT, add_special_tokens=False,
                                  split_special_tokens=True)["input_ids"]
  b = wp.batch([INJECT], split_special_tokens=True)["input_ids"][0]
  assert b[0] == wp.cls_id and b[-1] == wp.sep_id and not specials & set(b[1:-1].tolist())

  H.write_bpe_tokenizer(str(tmp_path / "bpe"))
  bpe = hf_tokenizers.load(str(tmp_path / "bpe"))
  assert bpe.eos_id in bpe.encode(INJECT)
  assert bpe.eos_id not in bpe.encode_ordinary(INJECT)
  assert bpe.decode(bpe.encode_ordinary(INJECT)) == INJECT
  # the LM pipeline: EOS only where documents end
  stream = lm.TokenStream.from_documents([INJECT, "second " + INJECT], bpe, add_eos=True)
  eos_at = np.flatnonzero(stream.tokens == bpe.eos_id)
  assert eos_at.tolist() == [len(bpe.encode_ordinary(INJECT)), len(stream) - 1]


def test_sentencepiece_specials_are_control_symbols_and_legacy_ones_are_split(tmp_path):
  import sentencepiece as spm
  from bigmodel.data import tokenizers
  corpus = tmp_path / "c.txt"
  corpus.write_text("\n".join(f"{INJECT} {i} the queen and the lord" for i in range(200)))
  model = tokenizers.train_sentencepiece([str(corpus)], 60, "unigram", str(tmp_path / "new"),
                                         special_tokens=["[CLS]", "[SEP]", "[MASK]"])
  tok = tokenizers.SentencePieceTokenizer(model)
  ids = {tok.piece_to_id(p) for p in ("[CLS]", "[SEP]", "[MASK]")}
  assert len(ids) == 3 and tok.sp.unk_id() not in ids
  assert not ids & set(tok.encode(INJECT)) and not ids & set(tok.encode_ordinary(INJECT))
  # a model trained before, with the specials as user-defined symbols (matched in text)
  spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "old"), vocab_size=60,
                                 user_defined_symbols="[CLS],[SEP],[MASK]", minloglevel=2,
                                 pad_id=0, unk_id=1, bos_id=2, eos_id=3)
  old = tokenizers.SentencePieceTokenizer(str(tmp_path / "old.model"))
  ids = {old.piece_to_id(p) for p in ("[CLS]", "[SEP]", "[MASK]")}
  assert ids <= set(old.encode(INJECT))
  assert not ids & set(old.encode_ordinary(INJECT))
  assert old.encode_ordinary("the queen") == old.encode("the queen")


def test_bert_pretraining_rows_get_control_tokens_only_where_the_pipeline_puts_them(tmp_path, monkeypatch):
  from bigmodel.data import bert
  monkeypatch.setenv("BIGMODEL_CACHE_DIR", str(tmp_path / "cache"))
  from tests.test_bert_data import write_corpus
  corpus = write_corpus(tmp_path / "corpus.txt", n_docs=16)
  text = corpus.read_text().replace(" .", " said [MASK] and [SEP] then [CLS] .")
  corpus.write_text(text)
  data = bert.BertData.build(mlm_cfg(files=[str(corpus)], documents="blank_line", tokenizer="spm:56",
                                        seq_len=32, dupe_factor=1, eval_batches=2, val_fraction=0.2))
  vocab = data.vocab
  for b in data.eval_batches(8).as_numpy_iterator():
    for ids, mask, pos, mids, w in zip(b["input_ids"], b["input_mask"], b["masked_lm_positions"],
                                       b["masked_lm_ids"], b["masked_lm_weights"]):
      real = ids[mask.astype(bool)]
      originals = real.copy()
      originals[pos[w > 0]] = mids[w > 0]                   # undo the masking
      assert originals[0] == vocab.cls and (originals == vocab.cls).sum() == 1
      assert (originals == vocab.sep).sum() == 2 and originals[-1] == vocab.sep
      assert (originals == vocab.mask).sum() == 0


# ---------------------------------------------------------------------------------------
# bench: equal work in the BERT baseline; the residual-gradient figure; the host.

def test_bert_baseline_projects_only_the_gathered_positions():
  import torch
  from bigmodel import bench
  point = bench.Point("bert", ("experiments/sizes/bert_tiny.gin", "experiments/runs/pretrain_bert.gin"),
                      ("TRAIN_STEPS = 10", "BATCH_SIZE = 4", "SEQ_LEN = 32", "WARMUP_STEPS = 1",
                       "LEARNING_RATE = 1e-4", "ModelConfig.vocab_size = 1000"))
  exp = bench.configure(point)
  slots = bench.random_batch("bert_mlm_nsp", 4, 32, exp.model.vocab_size)["masked_lm_positions"].shape[1]
  runner = bench.HFTorchRunner(exp)
  seen = []
  runner.model.cls.predictions.decoder.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
  runner.step()
  assert seen == [(4, slots, exp.model.vocab_size)] and slots < 32
  assert np.isfinite(runner.loss()) and runner.loss() > 0
  assert isinstance(runner.model.cls.seq_relationship, torch.nn.Linear)   # NSP trained too


def test_bench_reports_the_residual_gradient_figure_and_the_host(tmp_path, capsys):
  """nanoGPT's shape (4 layers): the widest backward fusion is the residual-gradient chain
  without `materialize_cotangent` (measured 18 operands) and narrower with it (7)."""
  import json
  from bigmodel import bench
  out = tmp_path / "r.json"
  assert bench.main(["--preset", "nanogpt", "--warmup", "1", "--steps", "1", "--rounds", "1",
                     "--baseline", "off", "--no_input_pipeline", "--peak_flops", "1e11",
                     "--out", str(out)]) == 0
  printed = capsys.readouterr().out
  data = json.loads(out.read_text())
  (rec,) = data["records"]
  g = rec["residual_gradient"]
  assert g["widest_fusion_operands"] < g["widest_fusion_operands_without_barrier"], g
  assert f"widest backward fusion {g['widest_fusion_operands']} operands" in printed
  host = data["host"]
  for key in ("cpu_model", "cpu_count", "cpu_usable", "platform", "jax", "peak_flops", "peak_source"):
    assert host.get(key), key
  assert rec["host"]["cpu_model"] == host["cpu_model"] and rec["host"]["peak_flops"] == 1e11
  assert f"host: {host['cpu_model']}" in printed and f"host: {host['cpu_model']}" in (tmp_path / "r.md").read_text()
