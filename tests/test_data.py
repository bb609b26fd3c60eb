"""LM input pipeline: packing, positions, shuffling, resume position, host slices, sources."""

import numpy as np
import pytest

from bigmodel.config import DataConfig
from bigmodel.data import lm, sources, tokenizers
from bigmodel.data.sources import DataError


def _stream(docs, tok=None):
  tok = tok or tokenizers.ByteTokenizer()
  return lm.TokenStream.from_documents(docs, tok, add_eos=True), tok


def _take(ds, n=None):
  out = list(ds.as_numpy_iterator())
  return out if n is None else out[:n]


def test_rows_pack_documents_with_segments_positions_and_weights():
  stream, tok = _stream(["abc", "defgh", "ij"])          # + EOS each: 4 + 6 + 3 = 13 tokens
  assert len(stream) == 13
  (b,) = _take(lm.batches(stream, seq_len=12, stride=12, global_batch=1, seed=0, shuffle=False,
                          num_steps=1))
  seg, pos, w = b["segment_ids"][0], b["positions"][0], b["weights"][0]
  np.testing.assert_array_equal(seg, [1] * 4 + [5] * 6 + [11] * 2)
  np.testing.assert_array_equal(pos, [0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 0, 1])
  # the target after each document's EOS belongs to the next document: weight 0
  np.testing.assert_array_equal(w, [1, 1, 1, 0, 1, 1, 1, 1, 1, 0, 1, 1])
  np.testing.assert_array_equal(b["targets"][0][:-1], b["inputs"][0][1:])
  assert tok.decode(b["inputs"][0][:3]) == "abc"


def test_positions_restart_at_a_row_starting_mid_document():
  stream, _ = _stream(["abcdefghijklmnop"])
  batches = _take(lm.batches(stream, seq_len=4, stride=4, global_batch=2, seed=0, shuffle=False,
                             num_steps=1))
  np.testing.assert_array_equal(batches[0]["positions"], [[0, 1, 2, 3]] * 2)


def test_shuffle_is_deterministic_by_seed():
  stream, _ = _stream(["".join(chr(33 + i % 90) for i in range(400))])
  a = _take(lm.batches(stream, 8, 8, 10, seed=1, shuffle=True, num_steps=4))
  b = _take(lm.batches(stream, 8, 8, 10, seed=1, shuffle=True, num_steps=4))
  c = _take(lm.batches(stream, 8, 8, 10, seed=2, shuffle=True, num_steps=4))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["inputs"], y["inputs"])
  assert any(not np.array_equal(x["inputs"], z["inputs"]) for x, z in zip(a, c))


def test_one_epoch_visits_every_row_once():
  text = "".join(chr(65 + i % 26) + chr(97 + i // 26) for i in range(200))   # distinct 2-char rows
  stream, _ = _stream([text])
  n_rows = lm.num_rows(len(stream), 1, 2)
  epoch = _take(lm.batches(stream, 1, 2, 10, seed=3, shuffle=True, num_steps=n_rows // 10))
  seen = [tuple(r) for b in epoch for r in np.stack([b["inputs"][:, 0], b["targets"][:, 0]], 1)]
  assert len(seen) == n_rows and len(set(seen)) == n_rows


def test_resume_position_is_exact():
  stream, _ = _stream(["the quick brown fox jumps over the lazy dog " * 20])
  full = _take(lm.batches(stream, 16, 3, 4, seed=0, shuffle=True, num_steps=30))
  resumed = _take(lm.batches(stream, 16, 3, 4, seed=0, shuffle=True, start_step=17, num_steps=13))
  for x, y in zip(full[17:], resumed):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_host_slices_make_up_the_global_batch():
  stream, _ = _stream(["lorem ipsum dolor sit amet " * 30])
  whole = _take(lm.batches(stream, 8, 5, 8, seed=0, shuffle=True, num_steps=3))
  halves = [_take(lm.batches(stream, 8, 5, 8, seed=0, shuffle=True, num_steps=3, host_rows=(h * 4, 4)))
            for h in range(2)]
  for i in range(3):
    np.testing.assert_array_equal(np.concatenate([halves[0][i]["inputs"], halves[1][i]["inputs"]]),
                                  whole[i]["inputs"])


def test_split_keeps_document_starts_valid():
  stream, _ = _stream(["a" * 50, "b" * 50])
  train, val = stream.split(0.3)
  assert len(train) + len(val) == len(stream)
  assert (val.doc_start >= 0).all() and (val.doc_start <= np.arange(len(val))).all()


def test_empty_and_too_small_data_errors(tmp_path):
  stream, _ = _stream(["ab"])
  with pytest.raises(DataError, match="fewer than one row"):
    lm.batches(stream, 16, 16, 2, seed=0, shuffle=True)
  stream, _ = _stream(["abcdefghijklmnopqrstuvwxyz"])
  with pytest.raises(DataError, match="fewer than one batch"):
    lm.batches(stream, 8, 8, 64, seed=0, shuffle=True)
  empty = tmp_path / "empty.txt"
  empty.write_text("\n\n  \n")
  with pytest.raises(DataError, match="empty"):
    lm.LMData.build(DataConfig(files=[str(empty)], tokenizer="byte"))


def test_sources_documents_and_quirks(tmp_path):
  f = tmp_path / "wiki.raw"
  f.write_bytes("\ufeff = Alpha = \r\n text a \r\n = = Sub = = \r\n more a \r\n = Beta = \r\n text b \r\n".encode())
  docs = sources.read_documents([str(f)], "heading")
  assert len(docs) == 2 and docs[0].startswith(" = Alpha =") and "Sub" in docs[0] and "\r" not in docs[0]
  assert sources.split_documents("a\n\n\nb\nc\n\n", "blank_line") == ["a", "b\nc"]
  assert sources.split_documents("a\n\nb\n", "line") == ["a", "b"]


def test_missing_files(tmp_path):
  (tmp_path / "x1.txt").write_text("hello")
  (tmp_path / "x2.txt").write_text("world")
  assert len(sources.resolve_files(["x*.txt"], str(tmp_path))) == 2
  # an explicitly named file that does not exist is an error, even with a TFDS fallback
  with pytest.raises(DataError, match="no file matches"):
    sources.resolve_files([str(tmp_path / "nope.txt")], str(tmp_path), allow_fallback=True)
  # a recipe's relative file missing from the data directory falls back to TFDS
  assert sources.resolve_files(["tinyshakespeare/input.txt"], str(tmp_path), allow_fallback=True) is None
  with pytest.raises(DataError, match="no file matches"):
    sources.resolve_files(["nope.txt"], str(tmp_path))


def test_char_tokenizer_roundtrip_and_unknown_char(tmp_path):
  tok = tokenizers.CharTokenizer.fit(["hello world"])
  ids = tok.encode_array("hello")
  assert tok.decode(ids) == "hello" and tok.vocab_size == 8
  with pytest.raises(ValueError, match="'z'"):
    tok.encode_array("zebra")
  tok.save(str(tmp_path))
  assert tokenizers.load(str(tmp_path)).chars == tok.chars


def test_shakespeare_from_the_data_directory(shared_data):
  data = lm.LMData.build(DataConfig(data_dir=str(shared_data), files=["tinyshakespeare/input.txt"],
                                    tokenizer="char", seq_len=64, val_fraction=0.1))
  assert data.tokenizer.vocab_size == 65
  assert len(data.train) + len(data.val) == 1115394


def test_recipe_falls_back_to_tfds_when_the_data_directory_lacks_its_files(tmp_path):
  import tensorflow_datasets as tfds
  cfg = DataConfig(data_dir=str(tmp_path), files=["tinyshakespeare/input.txt"],
                   tfds_name="tiny_shakespeare", tokenizer="byte", seq_len=8)
  with tfds.testing.mock_data(num_examples=3):
    train, val, source = sources.lm_documents(cfg)
  assert source == "TFDS tiny_shakespeare"
  assert len(train) == 3 and len(val) == 3 and all(isinstance(d, str) for d in train)
  # an explicit file never falls back
  explicit = DataConfig(files=[str(tmp_path / "mine.txt")], tfds_name="tiny_shakespeare")
  with pytest.raises(DataError, match="mine.txt"):
    sources.lm_documents(explicit)
