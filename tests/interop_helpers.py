"""Tiny Hugging Face checkpoints for the interop tests, built with transformers on PyTorch CPU.

Every parameter is redrawn (weights ~ N(0, 0.2), LayerNorm scales ~ 1 + N(0, 0.2)) so that no
bias is zero and no scale is one: a wrongly mapped tensor changes the outputs.
"""

from __future__ import annotations

import os

import numpy as np
import torch
import transformers
from tokenizers import ByteLevelBPETokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps.",
    "Hello world! It's 2024, isn't it?  Spaces   and\ttabs here.",
    "A customer asked how to reset a password; the agent answered politely.",
    "naïve café, crème brûlée and 北京 are handled byte by byte.",
] * 4

BERT_WORDS = ("the a an is was dog cat fox sat on mat quick brown jumps over lazy hello world "
              "and or not to of in it this that reset password customer agent . , ! ? ' - "
              "run ##s ##ing ##ed ##ly un ##believ ##able").split()


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen) * 0.2
      p.copy_(noise + 1.0 if ("LayerNorm.weight" in name or name.endswith(("ln_1.weight",
              "ln_2.weight", "ln_f.weight"))) else noise)
  return model.eval()


def write_bpe_tokenizer(directory: str, vocab_size: int = 300) -> int:
  """A byte-level BPE (GPT-2 format: vocab.json + merges.txt) trained on CORPUS."""
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator(CORPUS, vocab_size=vocab_size, min_frequency=1,
                          special_tokens=["<|endoftext|>"], show_progress=False)
  os.makedirs(directory, exist_ok=True)
  bpe.save_model(directory)
  return bpe.get_vocab_size()


def write_wordpiece_vocab(directory: str, cased: bool = False) -> int:
  """A small BERT vocab.txt: specials, letters, ##letters and some words."""
  letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
  if cased:
    letters += [chr(c) for c in range(ord("A"), ord("Z") + 1)]
  pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + letters + ["##" + c for c in letters]
  pieces += [w for w in BERT_WORDS if w not in pieces] + (["Hello", "World", "The"] if cased else [])
  pieces += ["0", "1", "2", "4", "é", "##é", "北", "京"]
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, "vocab.txt"), "w", encoding="utf-8") as f:
    f.write("".join(p + "\n" for p in pieces))
  return len(pieces)


def gpt2_dir(directory: str, *, tie: bool = True, seed: int = 0, n_positions: int = 64) -> str:
  """A GPT2LMHeadModel (2 layers, d 32, 4 heads) with its byte-level BPE files."""
  vocab = write_bpe_tokenizer(directory)
  torch.manual_seed(seed)
  cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=n_positions, n_embd=32, n_layer=2,
                                n_head=4, bos_token_id=0, eos_token_id=0, tie_word_embeddings=tie)
  model = randomize(transformers.GPT2LMHeadModel(cfg), seed)
  model.save_pretrained(directory)
  return directory


def bert_dir(directory: str, arch: str = "BertForPreTraining", *, seed: int = 0,
             pooler: bool = True, hidden_act: str = "gelu") -> str:
  """A tiny BERT (2 layers, d 32, 4 heads, d_ff 37) of `arch` with its vocab.txt."""
  vocab = write_wordpiece_vocab(directory)
  torch.manual_seed(seed)
  cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=37,
                                max_position_embeddings=40, hidden_act=hidden_act)
  cls = getattr(transformers, arch)
  model = cls(cfg, add_pooling_layer=False) if arch == "BertModel" and not pooler else cls(cfg)
  randomize(model, seed).save_pretrained(directory)
  return directory


def random_batch(vocab: int, b: int = 3, s: int = 16, seed: int = 0):
  """(ids, right-padded mask, token types) with rows of length s, 10 and 5."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, vocab, (b, s))
  mask = np.ones((b, s), np.int64)
  mask[1, 10:] = 0
  mask[2, 5:] = 0
  types = np.broadcast_to((np.arange(s) >= s // 2).astype(np.int64), (b, s)).copy()
  return ids, mask, types


def max_diff(ours, ref, valid=None) -> float:
  d = np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))
  if valid is not None:
    d = d[np.asarray(valid, bool)]
  return float(d.max())


def tensors_of(path: str) -> dict:
  from safetensors.numpy import load_file
  return load_file(os.path.join(path, "model.safetensors"))


def assert_bitwise_equal(a: dict, b: dict) -> None:
  assert sorted(a) == sorted(b), f"names differ: {sorted(set(a) ^ set(b))}"
  for k in a:
    assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
    assert a[k].tobytes() == b[k].tobytes(), f"{k} differs"


_CONVERTED: dict = {}


def converted_bert(tmp_path_factory) -> str:
  """`bigmodel convert from-hf` of a tiny BertForPreTraining (bert_dir's defaults), run once per
  test process and shared read-only by the modules that fine-tune from it."""
  base = str(tmp_path_factory.getbasetemp())
  if base not in _CONVERTED:
    from bigmodel import cli
    tmp = tmp_path_factory.mktemp("converted_bert")
    src = bert_dir(str(tmp / "hf"))
    work = str(tmp / "work")
    assert cli.main(["convert", "from-hf", "--model_dir", src, "--out", work]) == 0
    _CONVERTED[base] = work
  return _CONVERTED[base]
