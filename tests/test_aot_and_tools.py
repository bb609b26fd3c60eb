"""Ahead-of-time compilation of every recipe, the compile command, and tokenizer training."""

import pathlib

import pytest

from bigmodel import aot, cli, config
from bigmodel.config import MeshConfig
from tests.helpers import ROOT, cli as run_cli

RECIPES = sorted(p for p in (ROOT / "experiments").rglob("*.gin")
                 if p.parent.name not in ("sizes", "runs"))


def test_there_are_recipes():
  assert any(p.name == "gpt_shakespeare_char.gin" for p in RECIPES)


# Fine-tuning recipes name their data and starting point by macro; compiling needs neither.
FINETUNE_PLACEHOLDERS = ["TRAIN_FILE = 'train.tsv'", "EVAL_FILE = 'dev.tsv'", "INIT_CHECKPOINT = ''"]
# The test variants take the model size from the run they start from.
MINILM, NANO = "experiments/sizes/minilm_l6.gin", "experiments/sizes/gpt_nano.gin"
SIZE_FOR = {"sst2_fast.gin": [MINILM], "conll2003_fast.gin": [MINILM], "xquad_fast.gin": [MINILM],
            "sst2_gpt_fast.gin": [NANO]}
EXTRA_FOR = {"sst2_gpt_fast.gin": ["ModelConfig.vocab_size = 257"]}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "experiments")))
def test_every_recipe_compiles_ahead_of_time(recipe):
  files = SIZE_FOR.get(recipe.name, [])
  bindings = FINETUNE_PLACEHOLDERS if recipe.parent.name == "finetune" else []
  bindings = bindings + EXTRA_FOR.get(recipe.name, [])
  exp = config.load(files + [str(recipe)], bindings)
  report = aot.compile_train_step(exp, MeshConfig(data=2, fsdp=2, tensor=2))
  assert report["devices"] == 8 and report["params"] > 0
  assert report["memory"]["total_bytes_per_device"] > 0
  assert "per-device memory" in aot.format_report(report)


def test_gpt2_small_shape_compiles_with_fsdp_and_tensor():
  exp = config.load(["experiments/sizes/gpt2_small.gin", "experiments/runs/pretrain_lm.gin"],
                    ["TRAIN_STEPS = 10", "BATCH_SIZE = 8", "SEQ_LEN = 256", "ModelConfig.remat = 'full'"])
  report = aot.compile_train_step(exp, MeshConfig(data=1, fsdp=4, tensor=2))
  assert 124e6 < report["params"] < 125e6
  # params + Adam moments of 124M f32 values, sharded 8 ways, is ~186 MB per device
  assert report["memory"]["argument_size_in_bytes"] < 0.3e9


def test_compile_command_uses_fake_devices():
  out = run_cli(["compile", "--gin_file=experiments/gpt_shakespeare_char.gin",
                 "--mesh", "data=2,fsdp=2,tensor=2"], devices=None).stdout
  assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2} (8 devices)" in out and "per-device memory" in out


@pytest.mark.parametrize("model_type", ["unigram", "bpe", "char"])
def test_tokenizer_train(tmp_path, text_corpus, capsys, model_type):
  prefix = tmp_path / f"sp_{model_type}"
  code = cli.main(["tokenizer", "train", "--input", str(text_corpus), "--vocab_size", "40",
                   "--model_type", model_type, "--out", str(prefix),
                   "--special_tokens", "[CLS]", "[SEP]", "[MASK]"])
  assert code == 0 and "pieces" in capsys.readouterr().out
  from bigmodel.data.tokenizers import SentencePieceTokenizer
  tok = SentencePieceTokenizer(str(prefix) + ".model")
  text = "the king and the queen."
  assert tok.decode(tok.encode(text)) == text
  assert tok.piece_to_id("[MASK]") not in (tok.piece_to_id("<unk>"),)
