"""`bigmodel convert from-hf / to-hf`: the workdir it writes serves sample, eval and train, and
goes back to Hugging Face bitwise."""

import json
import math
import os
import random

import numpy as np
import pytest
import torch
import transformers

import bigmodel
from bigmodel import cli
from tests import interop_helpers as H
from tests.helpers import run_main as _run


def _corpus(path, words, docs=40, seed=0):
  rng = random.Random(seed)
  text = "\n\n".join(" ".join(" ".join(rng.choice(words) for _ in range(rng.randint(4, 9))).capitalize()
                               + "." for _ in range(rng.randint(3, 6))) for _ in range(docs))
  path.write_text(text + "\n")
  return str(path)


@pytest.mark.slow
def test_gpt2_workdir_samples_evaluates_trains_and_exports(tmp_path, capsys):
  src = H.gpt2_dir(str(tmp_path / "hf"))
  work = str(tmp_path / "work")
  summary = json.loads(_run(capsys, "convert", "from-hf", "--model_dir", src, "--out", work))
  assert summary["architecture"] == "GPT2LMHeadModel"
  assert os.path.isdir(os.path.join(work, "checkpoints", "0"))
  for f in ("config.gin", "vocab.json", "merges.txt", "hf_import.json"):
    assert os.path.exists(os.path.join(work, f)), f

  # sample (greedy) == transformers' greedy generation
  tok = bigmodel.load_pretrained(src).tokenizer
  ref = transformers.GPT2LMHeadModel.from_pretrained(src).eval()
  prompt = "The quick brown"
  ids = torch.tensor([tok.encode(prompt)])
  with torch.no_grad():
    gen = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                       pad_token_id=0)[0].tolist()
  text = _run(capsys, "sample", "--workdir", work, "--prompt", prompt, "--num_tokens", "12",
              "--temperature", "0")
  assert text.rstrip("\n") == tok.decode(gen)

  # to-hf: bitwise the source tensors, and transformers loads model and tokenizer
  out = str(tmp_path / "back")
  _run(capsys, "convert", "to-hf", "--checkpoint", work, "--out", out)
  H.assert_bitwise_equal(H.tensors_of(src), H.tensors_of(out))
  assert transformers.AutoTokenizer.from_pretrained(out)(prompt)["input_ids"] == tok.encode(prompt)
  assert type(transformers.AutoModelForCausalLM.from_pretrained(out)).__name__ == "GPT2LMHeadModel"

  # load_pretrained of the workdir == of the HF directory
  a, b = bigmodel.load_pretrained(work), bigmodel.load_pretrained(src)
  assert a.step == 0 and a.architecture == "GPT2LMHeadModel"
  x = np.random.default_rng(0).integers(0, a.config.vocab_size, (2, 10))
  np.testing.assert_array_equal(np.asarray(a.apply(x)["logits"]), np.asarray(b.apply(x)["logits"]))

  # eval, and a new run fine-tuned from the imported weights (TrainConfig.init_checkpoint)
  corpus = _corpus(tmp_path / "corpus.txt", "the quick brown fox jumps over lazy dog hello world".split())
  data = [f"--gin.DataConfig.files=['{corpus}']", "--gin.DataConfig.seq_len=16",
          "--gin.DataConfig.documents='blank_line'"]
  result = json.loads(_run(capsys, "eval", "--workdir", work, *data))
  assert result["step"] == 0 and math.isfinite(result["loss"])
  tuned = str(tmp_path / "tuned")
  _run(capsys, "train", "--gin_file", os.path.join(work, "config.gin"), "--workdir", tuned, *data,
       f"--gin.TrainConfig.init_checkpoint='{work}'", "--gin.TrainConfig.train_steps=2",
       "--gin.OptimConfig.warmup_steps=1", "--gin.TrainConfig.peak_flops=1e11",
       "--gin.TrainConfig.async_checkpoints=False")
  after = bigmodel.load_pretrained(tuned)
  assert after.step == 2 and after.tokenizer.encode(prompt) == tok.encode(prompt)


@pytest.mark.slow
def test_bert_workdir_evaluates_and_exports(tmp_path, tmp_path_factory, capsys):
  # `convert from-hf` of bert_dir(HF, "BertForPreTraining") into WORK, shared with the fine-tuning tests
  work = H.converted_bert(tmp_path_factory)
  src = os.path.join(os.path.dirname(work), "hf")
  corpus = _corpus(tmp_path / "corpus.txt", "the a dog cat fox sat on mat quick brown hello world".split())
  result = json.loads(_run(capsys, "eval", "--workdir", work, f"--gin.DataConfig.files=['{corpus}']",
                           "--gin.DataConfig.seq_len=32", "--gin.DataConfig.documents='blank_line'"))
  assert result["step"] == 0 and math.isfinite(result["mlm_loss"]) and "nsp_accuracy" in result
  out = str(tmp_path / "back")
  _run(capsys, "convert", "to-hf", "--checkpoint", work, "--out", out)
  H.assert_bitwise_equal(H.tensors_of(src), H.tensors_of(out))
  cfg = json.loads(open(os.path.join(out, "config.json")).read())
  assert cfg["architectures"] == ["BertForPreTraining"] and cfg["hidden_act"] == "gelu"
  tok = transformers.AutoTokenizer.from_pretrained(out)
  assert tok("the dog sat")["input_ids"] == bigmodel.load_pretrained(src).tokenizer.encode("the dog sat", True)


def test_convert_errors_exit_2(tmp_path, capsys):
  assert cli.main(["convert", "from-hf", "--model_dir", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
  assert "not a Hugging Face checkpoint" in capsys.readouterr().err
  assert cli.main(["convert", "to-hf", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
  assert "neither a Hugging Face checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_model_trained_in_bigmodel_exports_to_transformers(tmp_path, capsys, text_corpus):
  from tests.helpers import gin_args, tiny_bindings
  work = str(tmp_path / "run")
  _run(capsys, "train", "--workdir", work, *gin_args(tiny_bindings(text_corpus, steps=2)))
  out = str(tmp_path / "hf")
  _run(capsys, "convert", "to-hf", "--checkpoint", work, "--out", out)
  pre = bigmodel.load_pretrained(work)
  ref = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
  ids = np.random.default_rng(0).integers(0, 257, (2, 12))
  with torch.no_grad():
    theirs = ref(torch.tensor(ids)).logits.numpy()
  assert H.max_diff(pre.apply(ids)["logits"], theirs) <= 1e-4
