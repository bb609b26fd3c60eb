"""Prompted-decoder fine-tuning (objective `prompted_lm`): the template and loss mask, the
readers, batched greedy decoding against `sample.generate`, SFT and translation end to end
through the CLI (finetune, evaluate, predict) on small generated files, and the errors."""

import csv
import functools
import json
import logging
import os
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel import cli
from bigmodel.config import ModelConfig, task_config
from bigmodel.objectives.prompted_lm import PromptedConfig
from bigmodel.data import prompted as pd
from bigmodel.data import readers, tokenizers
from bigmodel.data.sources import DataError
from bigmodel.infer import greedy, sample
from bigmodel.models.decoder import Decoder
from bigmodel.objectives import prompted_lm
from tests.helpers import run_main as _run

HERE = os.path.dirname(__file__)
SFT_FAST = os.path.join(HERE, "..", "experiments", "finetune", "bitext_sft_fast.gin")
MT_FAST = os.path.join(HERE, "..", "experiments", "finetune", "multi30k_fast.gin")

EN = "man woman dog cat red big small runs sits eats the a".split()
DE = "mann frau hund katze rot gross klein rennt sitzt isst der ein".split()
INTENTS = {"cancel": "Press Cancel.", "refund": "Refund in 5 days.\nBye.", "address": "Edit Profile."}
VERBS = ["how do I", "I want to", "help me", "can you", "please"]

prompted_cfg = functools.partial(task_config, PromptedConfig)   # DataConfig and PromptedConfig fields


def _fail(capsys, *args) -> str:
  capsys.readouterr()
  assert cli.main(list(args)) == 2
  return capsys.readouterr().err


def _parallel(tmp, name, n, seed):
  """A toy en->de task: word-by-word dictionary translation."""
  rng = random.Random(seed)
  m = dict(zip(EN, DE))
  src = [[rng.choice(EN) for _ in range(rng.randint(2, 5))] for _ in range(n)]
  (tmp / f"{name}.en").write_text("\n".join(" ".join(s) for s in src) + "\n")
  (tmp / f"{name}.de").write_text("\n".join(" ".join(m[w] for w in s) for s in src) + "\n")
  return str(tmp / f"{name}.en"), str(tmp / f"{name}.de")


def _sft_csv(path, n, seed):
  """Customer questions; the answer depends on the intent word only (multi-line answers
  inside quotes, as Bitext)."""
  rng = random.Random(seed)
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["instruction", "intent", "response"])
    for _ in range(n):
      k = rng.choice(sorted(INTENTS))
      w.writerow([f"{rng.choice(VERBS)} {k} {rng.choice(['my order', 'it', 'now'])}", k, INTENTS[k]])
  return str(path)


# ----------------------------------------------------------------------------- template and mask


def test_template_and_loss_mask():
  tok = tokenizers.ByteTokenizer()
  pairs = pd.Pairs(["hi", "abc"], ["yo", "z"], "mem")
  exs, counts = pd.encode_pairs(tok, "Q: {prompt}\nA:", pairs, seq_len=16)
  assert counts == {"examples": 2, "truncated": 0, "truncated_prompts": 0, "truncated_responses": 0}
  assert bytes(exs[0].prompt.tolist()) == b"Q: hi\nA:"
  assert list(exs[0].response) == [ord("y"), ord("o"), tok.eos_id]
  inp, tgt, w = pd.example_arrays(exs[0])
  p = len(exs[0].prompt)
  # targets from the last prompt position on are the response and the EOS: exactly these weigh
  assert list(tgt[p - 1:]) == [ord("y"), ord("o"), tok.eos_id]
  assert w.tolist() == [0.0] * (p - 1) + [1.0] * 3

  rows = pd.pack(exs, 16, packed=True)
  assert len(rows) == 2                    # two 10-token examples do not share 16 tokens
  rows = pd.pack(exs, 32, packed=True)
  assert len(rows) == 1 and rows.segment_ids[0].max() == 2
  assert rows.weights.sum() == 3 + 2       # "yo"+EOS, "z"+EOS
  assert rows.positions[0, len(inp)] == 0  # positions restart at the second example

  cfg = ModelConfig(vocab_size=257, d_model=32, num_layers=1, num_heads=2, max_len=32)
  model = Decoder(cfg)
  batch = {k: jnp.asarray(getattr(rows, k)) for k in pd.KEYS}
  params = jax.jit(model.init)(jax.random.key(0), *prompted_lm.model_args(batch))["params"]
  loss = jax.jit(lambda b: prompted_lm.prompted_lm_loss(model, params, b))
  base, aux = loss(batch)
  assert float(aux["weight"]) == 5
  prompt_pos = (rows.weights == 0) & (rows.segment_ids > 0)
  other = dict(batch, targets=jnp.where(prompt_pos, (batch["targets"] + 7) % 257, batch["targets"]))
  np.testing.assert_allclose(loss(other)[0], base, rtol=1e-6)     # prompt labels: no effect
  eos_pos = np.argwhere(rows.targets == tok.eos_id)[0]
  changed = dict(batch, targets=batch["targets"].at[tuple(eos_pos)].set(5))
  assert abs(float(loss(changed)[0]) - float(base)) > 1e-4        # the EOS after a response weighs
  resp_pos = np.argwhere((rows.weights == 1) & (rows.targets != tok.eos_id))[0]
  changed = dict(batch, targets=batch["targets"].at[tuple(resp_pos)].set(5))
  assert abs(float(loss(changed)[0]) - float(base)) > 1e-4        # response tokens weigh


def test_truncation_keeps_prompt_end_and_response_start(caplog, tmp_path):
  p, r = np.arange(100, 130), np.arange(1, 41)
  fp, fr = pd.fit(p, r, seq_len=31)         # 32 tokens: the prompt keeps at most half
  assert list(fp) == list(range(114, 130)) and list(fr) == list(range(1, 17))
  fp, fr = pd.fit(p[:4], r, seq_len=31)     # a short prompt stays whole
  assert len(fp) == 4 and list(fr) == list(range(1, 29))
  fp, fr = pd.fit(p, r[:3], seq_len=31)     # a long prompt gives way to a short response
  assert list(fr) == [1, 2, 3] and list(fp) == list(range(101, 130))
  src = tmp_path / "s.en"
  tgt = tmp_path / "s.de"
  src.write_text("a b\n" + "long " * 30 + "\n" + "c\n")
  tgt.write_text("x\ny\n" + "z " * 40 + "\n")
  cfg = prompted_cfg(files=[str(src)], target_files=[str(tgt)], val_files=[str(src)],
                   val_target_files=[str(tgt)], tokenizer="byte", seq_len=32, prompted_pack=False)
  with caplog.at_level(logging.WARNING):
    data = pd.PromptedData.build(cfg)
  assert "2 of 3 examples are longer than seq_len + 1 = 33 tokens and were truncated" in caplog.text
  assert data.train.counts["truncated_prompts"] == 1 and data.train.counts["truncated_responses"] == 1
  assert (data.train.weights.sum(1) > 0).all()          # no example lost its whole response


# ----------------------------------------------------------------------------- readers


def test_readers_on_tiny_fixtures(tmp_path):
  csv_path = tmp_path / "t.csv"
  csv_path.write_text('instruction,intent,response\nhow do I pay?,pay,"Step 1.\n\nStep 2, done."\n'
                      'refund it,refund,Sure\n')
  assert pd.read_sft(str(csv_path), "instruction", "response") == (
      ["how do I pay?", "refund it"], ["Step 1.\n\nStep 2, done.", "Sure"])
  jl = tmp_path / "t.jsonl"
  jl.write_text('{"q": "hello", "a": "hi there\\nbye"}\n\n{"q": "x", "a": "y"}\n')
  assert pd.read_sft(str(jl), "q", "a") == (["hello", "x"], ["hi there\nbye", "y"])
  assert pd.read_sft(str(jl), "q") == (["hello", "x"], None)
  src, tgt = _parallel(tmp_path, "p", 5, 0)
  cfg = prompted_cfg(files=[src], target_files=[tgt])
  train, held = pd.load_pairs(prompted_cfg(files=[src], target_files=[tgt], val_fraction=0.4))
  assert len(train) == 3 and len(held) == 2
  assert sorted(train.prompts + held.prompts) == sorted(open(src).read().splitlines())
  again = pd.load_pairs(prompted_cfg(files=[src], target_files=[tgt], val_fraction=0.4))[1]
  assert again.prompts == held.prompts                      # seeded: the same rows every time
  other = pd.load_pairs(prompted_cfg(files=[src], target_files=[tgt], val_fraction=0.4, seed=3))[1]
  assert len(other) == 2
  assert pd.read_eval_pairs(cfg, src).responses == open(tgt).read().splitlines()   # p.en -> p.de
  assert pd.read_eval_pairs(cfg, f"{src},{tgt}").prompts == open(src).read().splitlines()
  assert pd.target_path_for(str(tmp_path / "test.en"), cfg) == str(tmp_path / "test.de")
  assert pd.read_inputs(cfg, src) == open(src).read().splitlines()


def test_holdout_is_disjoint_and_seeded():
  tr, ev = pd.holdout(50, 0.1, 0)
  assert len(ev) == 5 and len(tr) == 45 and not set(tr) & set(ev)
  assert list(pd.holdout(50, 0.1, 0)[1]) == list(ev)
  assert list(pd.holdout(50, 0.1, 1)[1]) != list(ev)


# ----------------------------------------------------------------------------- greedy decoding


def test_greedy_batched_matches_sample_generate():
  cfg = ModelConfig(vocab_size=257, d_model=32, num_layers=2, num_heads=2, max_len=32,
                    positions="rope", init_std=0.5)
  model = Decoder(cfg)
  params = model.init(jax.random.key(1), jnp.zeros((1, 32), jnp.int32))["params"]
  tok = tokenizers.ByteTokenizer()
  prompts = ["ab", "hello there", "x"]
  n = 10
  want = [sample.generate(model, params, tok, p, n, 32, temperature=0.0) for p in prompts]
  ids = [tok.encode(p) for p in prompts]
  got = greedy.greedy_decode(model, params, ids, 32, eos_id=None, max_new_tokens=n, batch_size=2)
  # (16-column buckets: "hello there" + 10 tokens crosses into the second)
  assert [len(g) for g in got] == [n] * 3
  assert [tok.decode(i + g) for i, g in zip(ids, got)] == want
  # EOS ends a row: with the first generated token as "EOS" every row stops at once
  first = [g[0] for g in got]
  stopped = greedy.greedy_decode(model, params, ids[:1], 32, eos_id=first[0], max_new_tokens=n)
  assert stopped == [[]]
  # the window bounds the text
  full = greedy.greedy_decode(model, params, ids[1:2], 16, eos_id=None, max_new_tokens=0)
  assert len(ids[1]) + len(full[0]) == 16


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_translation_cli_from_scratch(tmp_path, capsys):
  src, tgt = _parallel(tmp_path, "train", 400, 0)
  vsrc, vtgt = _parallel(tmp_path, "val", 40, 1)
  tsrc, _ = _parallel(tmp_path, "test", 30, 2)
  work = str(tmp_path / "mt")
  out = _run(capsys, "finetune", "--gin_file", MT_FAST, f"--gin.TRAIN_FILE='{src}'",
             f"--gin.TARGET_FILE='{tgt}'", f"--gin.EVAL_FILE='{vsrc}'",
             f"--gin.EVAL_TARGET_FILE='{vtgt}'", "--workdir", work)
  assert "validation loss" in out
  assert os.path.exists(os.path.join(work, "tokenizer.model"))       # SentencePiece, trained here
  res = json.loads(_run(capsys, "evaluate", "--workdir", work))
  assert res["task"] == "translation" and res["examples"] == 40 and res["bleu_examples"] == 40
  assert res["bleu"] > 40, res                 # a word-by-word dictionary is learnable here
  assert res["perplexity"] < 3 and res["response_tokens"] > 40
  assert len(res["samples"]) == 5 and set(res["samples"][0]) == {"source", "reference", "hypothesis"}
  test = json.loads(_run(capsys, "evaluate", "--workdir", work, "--eval_file", tsrc,
                         "--out", str(tmp_path / "t.json")))
  assert test["examples"] == 30 and test["file"] == f"{tsrc} -> {tmp_path / 'test.de'}"
  preds_path = str(tmp_path / "p.jsonl")
  (tmp_path / "in.en").write_text("dog runs\nthe big cat\n")
  _run(capsys, "predict", "--workdir", work, "--input", str(tmp_path / "in.en"), "--out", preds_path)
  preds = [json.loads(line) for line in open(preds_path)]
  assert [p["source"] for p in preds] == ["dog runs", "the big cat"]
  assert all(p["translation"] for p in preds)


@pytest.mark.slow
def test_sft_cli_from_pretrained_gpt(tmp_path, capsys):
  """A GPT pretrained here (`bigmodel train`, byte tokenizer) starts the SFT run."""
  corpus = tmp_path / "c.txt"
  corpus.write_text("\n\n".join(f"{v} {k} it. " + INTENTS[k] for v in VERBS for k in INTENTS) + "\n")
  shape = ["--gin.ModelConfig.vocab_size=257", "--gin.ModelConfig.d_model=64",
           "--gin.ModelConfig.num_layers=2", "--gin.ModelConfig.num_heads=4",
           "--gin.ModelConfig.max_len=64"]
  pre = str(tmp_path / "pre")
  _run(capsys, "train", "--gin_file", os.path.join(HERE, "..", "experiments", "runs", "pretrain_lm.gin"),
       *shape, "--gin.TRAIN_STEPS=5", "--gin.BATCH_SIZE=8", "--gin.SEQ_LEN=32",
       f"--gin.DataConfig.files=['{corpus}']", "--gin.DataConfig.tokenizer='byte'",
       "--gin.DataConfig.documents='blank_line'", "--gin.TrainConfig.peak_flops=1e11",
       "--workdir", pre)
  train = _sft_csv(tmp_path / "train.csv", 300, 0)
  work = str(tmp_path / "sft")
  args = ["--gin_file", SFT_FAST, *shape, f"--gin.INIT_CHECKPOINT='{pre}'", "--gin.SPM_VOCAB=0",
          "--gin.SEQ_LEN=64", f"--gin.TRAIN_FILE='{train}'", "--gin.TRAIN_STEPS=200",
          "--gin.PromptedConfig.prompted_max_new_tokens=0",
          # the run memorizes its 10 answers (loss ~0.02 by step 100): against that window's
          # tiny spread, ordinary noise reads as a loss spike; only non-finite steps are bad here
          "--gin.TrainConfig.spike_zscore=0"]
  out = _run(capsys, "finetune", *args, "--workdir", work)
  assert "initialized params from" in out
  assert json.load(open(os.path.join(work, "tokenizer.json")))["type"] == "byte"
  res = json.loads(_run(capsys, "evaluate", "--workdir", work))
  assert res["task"] == "sft" and res["examples"] == 30                 # 10% held out
  assert "held out" in res["file"] and res["perplexity"] < 1.5, res
  assert len(res["samples"]) == 5
  good = sum(s["generated"] == s["reference"] for s in res["samples"])
  assert good >= 4, res["samples"]            # unseen questions get their intent's answer
  inp = tmp_path / "q.jsonl"
  inp.write_text('{"instruction": "please refund it"}\n{"instruction": "can you cancel now"}\n')
  preds_path = str(tmp_path / "a.jsonl")
  _run(capsys, "predict", "--workdir", work, "--input", str(inp), "--out", preds_path)
  preds = [json.loads(line) for line in open(preds_path)]
  assert [p["response"] for p in preds] == [INTENTS["refund"], INTENTS["cancel"]]


# ----------------------------------------------------------------------------- errors


def test_errors_are_clear(tmp_path, capsys):
  train = _sft_csv(tmp_path / "t.csv", 20, 0)
  base = ["finetune", "--gin_file", SFT_FAST, f"--gin.TRAIN_FILE='{train}'",
          "--workdir", str(tmp_path / "w")]
  err = _fail(capsys, *base, "--gin.RESPONSE_COLUMN='answer'")
  assert "t.csv: no column 'answer'" in err and "['instruction', 'intent', 'response']" in err
  empty = tmp_path / "e.csv"
  empty.write_text("")
  err = _fail(capsys, *base, f"--gin.EVAL_FILE='{empty}'")
  assert "e.csv: the file is empty" in err
  src, tgt = _parallel(tmp_path, "p", 5, 0)
  short = tmp_path / "short.de"
  short.write_text("ein\nzwei\n")
  err = _fail(capsys, "finetune", "--gin_file", MT_FAST, f"--gin.TRAIN_FILE='{src}'",
              f"--gin.TARGET_FILE='{short}'", "--workdir", str(tmp_path / "w2"))
  assert "p.en has 5 lines but" in err and "short.de has 2" in err
  err = _fail(capsys, *base, "--gin.SPM_VOCAB=0", "--gin.TOKENIZER='char'")
  assert "end-of-sequence" in err
  err = _fail(capsys, *base, "--gin.PROMPT_TEMPLATE='Q: '")
  assert "no {prompt} placeholder" in err
  assert not os.path.exists(tmp_path / "w" / "config.gin")     # nothing written
  with pytest.raises(DataError, match="val_fraction"):
    pd.holdout(3, 0.1, 0)
  with pytest.raises(DataError, match="empty"):
    readers.read_parallel(str(empty), str(empty))
