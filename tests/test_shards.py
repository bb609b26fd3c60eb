"""Prepared (pre-tokenized, sharded) LM data: `bigmodel data prepare` and the streaming reader."""

import dataclasses
import json
import os
import random

import numpy as np
import pytest

from bigmodel.data import lm, prepare, shards
from bigmodel.data.sources import DataError
from tests.helpers import run_main, tiny_bindings, tiny_experiment

SEQ = 16
# prepare's workers are forked; they run numpy and the tokenizer only, never JAX, so JAX's
# warning about forking its (test-initialized) threads does not apply to them.
FORK_OK = pytest.mark.filterwarnings("ignore:os.fork\\(\\) was called:RuntimeWarning")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """~60 KB of generated documents separated by blank lines."""
  rng = random.Random(1)
  words = "the king queen lord lady sword crown castle night day love war peace river".split()
  docs = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 120))) + "."
          for _ in range(600)]
  path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
  path.write_text("\n\n".join(docs) + "\n")
  return path


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
  """(in-memory data config, prepared dir) for the same corpus and settings."""
  cfg = tiny_experiment(str(corpus), seq=SEQ).data
  out = str(tmp_path_factory.mktemp("prep") / "c")
  summary = prepare.prepare(cfg, out, workers=1)
  assert summary["chunks"] == 1 and summary["token_dtype"] == "uint16"
  return cfg, out


def _numbered_dir(tmp_path, shard_rows=(37, 5, 58)) -> str:
  """A prepared dir of generated rows whose first two tokens spell the global row id."""
  fmt = prepare.RowFormat(SEQ, "uint16")
  streams, r = [], 0
  for n in shard_rows:
    tok = np.zeros(n * SEQ + 1, np.int64)
    ids = np.arange(r, r + n)
    tok[0:-1:SEQ], tok[1:-1:SEQ] = ids % 256, ids // 256
    starts = np.zeros(len(tok), bool)
    starts[::5] = True
    streams.append((tok, starts))
    r += n
  out = str(tmp_path / "numbered")
  index = {"format": prepare.FORMAT, "version": prepare.VERSION, "seq_len": SEQ,
           "window_stride": SEQ, "token_dtype": "uint16", "row_bytes": fmt.row_bytes,
           "vocab_size": 257, "eos_id": 256, "add_eos": True, "documents": "file",
           "tokenizer": "byte",
           "splits": {"train": prepare.write_token_shards(out, "train", streams, fmt, SEQ),
                      "val": prepare.write_token_shards(out, "val", streams[:1], fmt, SEQ)}}
  prepare.write_index(out, index)
  from bigmodel.data import tokenizers
  tokenizers.ByteTokenizer().save(out)
  return out


def _prepared_data(out, **kw):
  cfg = dataclasses.replace(tiny_experiment("unused.txt", seq=SEQ).data, prepared_dir=out, **kw)
  return lm.LMData.build(cfg)


def _row_ids(batch) -> np.ndarray:
  return batch["inputs"][:, 0].astype(np.int64) + 256 * batch["inputs"][:, 1]


def _same_partition(a, b):
  """Segment ids that split each row into the same documents (numbering aside)."""
  return np.array_equal(a[:, :, None] == a[:, None, :], b[:, :, None] == b[:, None, :])


def test_rows_and_batches_equal_the_in_memory_pipeline(prepared):
  cfg, out = prepared
  mem, disk = lm.LMData.build(cfg), lm.LMData.build(dataclasses.replace(cfg, prepared_dir=out))
  assert isinstance(disk, shards.PreparedLMData) and disk.tokenizer.vocab_size == 257
  assert disk.readers["train"].rows == lm.num_rows(len(mem.train), SEQ, SEQ)
  assert disk.readers["val"].rows == lm.num_rows(len(mem.val), SEQ, SEQ)
  for got, want in [(disk.train_batches(8, 0), mem.train_batches(8, 0)),
                    (disk.eval_batches(8), mem.eval_batches(8))]:
    n = 0
    for g, w in zip(got.take(6).as_numpy_iterator(), want.take(6).as_numpy_iterator()):
      for k in ("inputs", "targets", "positions", "weights"):
        np.testing.assert_array_equal(g[k], w[k], err_msg=k)
      assert _same_partition(g["segment_ids"], w["segment_ids"])
      n += 1
    assert n >= 2


@FORK_OK
def test_parallel_chunked_prepare_is_deterministic_and_keeps_documents(corpus, tmp_path):
  cfg = tiny_experiment(str(corpus), seq=SEQ).data
  chunk_mb = 8e3 / 2**20     # ~8 KB pieces: several chunks, cut at blank lines
  a = prepare.prepare(cfg, str(tmp_path / "a"), workers=1, chunk_mb=chunk_mb)
  b = prepare.prepare(cfg, str(tmp_path / "b"), workers=2, chunk_mb=chunk_mb)
  assert a["chunks"] == b["chunks"] > 4 and b["workers"] == 2
  for name in sorted(os.listdir(tmp_path / "a")):
    assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
  # the chunks hold the same documents as the whole file
  chunks = prepare.plan_chunks([str(corpus)], "blank_line", "train", int(chunk_mb * 2**20))
  docs = [d for c in chunks for d in prepare.chunk_documents(c, "blank_line")]
  from bigmodel.data import sources
  assert docs == sources.read_documents([str(corpus)], "blank_line")


def test_epochs_hosts_and_resume(tmp_path):
  data = _prepared_data(_numbered_dir(tmp_path))
  n, batch, hosts = 100, 10, 4
  assert data.readers["train"].rows == n
  full = [b for b in data.train_batches(batch, 0).take(2 * n // batch).as_numpy_iterator()]
  ids = np.concatenate([_row_ids(b) for b in full])
  # each epoch visits every row exactly once, in a fresh order
  assert sorted(ids[:n]) == list(range(n)) and sorted(ids[n:]) == list(range(n))
  assert not np.array_equal(ids[:n], ids[n:])
  # host slices (uneven) partition every global batch
  slices = [(0, 2), (2, 3), (5, 4), (9, 1)]
  assert len(slices) == hosts
  per_host = [list(data.train_batches(batch, 0, s).take(len(full)).as_numpy_iterator())
              for s in slices]
  for step, want in enumerate(full):
    got = {k: np.concatenate([h[step][k] for h in per_host]) for k in want}
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  # reading rows opens only the shards that hold them (rows 37..41 are the second shard's)
  fresh = _prepared_data(data.directory).readers["train"]
  assert _row_ids({"inputs": shards.decode_rows(fresh.read(np.array([41, 38])), fresh.fmt)["inputs"]}
                  ).tolist() == [41, 38]
  assert list(fresh._open) == [1] and len(fresh.files) == 3
  # the batch at step i is the same started fresh or resumed at i (also past an epoch)
  for i in (3, 13):
    resumed = next(data.train_batches(batch, i).as_numpy_iterator())
    for k in resumed:
      np.testing.assert_array_equal(resumed[k], full[i][k])
  # another seed, another order
  other = _prepared_data(data.directory, seed=1)
  assert other.fingerprint == data.fingerprint and len(data.fingerprint) == 16   # the data, not the order
  assert not np.array_equal(_row_ids(next(other.train_batches(batch, 0).as_numpy_iterator())),
                            _row_ids(full[0]))


def test_eval_pass_pads_with_zero_weight(tmp_path):
  data = _prepared_data(_numbered_dir(tmp_path), eval_batches=10)    # 37 validation rows
  batches = list(data.eval_batches(16).as_numpy_iterator())
  assert len(batches) == 3
  ids = np.concatenate([_row_ids(b) for b in batches])
  real = np.concatenate([b["weights"].sum(1) > 0 for b in batches])
  np.testing.assert_array_equal(ids[:37], np.arange(37))
  assert real[:37].all() and not real[37:].any()


def test_int64_row_ids_past_2_to_31(tmp_path):
  """A prepared dir with a sparse shard of 2^31 + 9 rows: positions past 2^31 rows (and past
  2^32 bytes) are read through the real reader; the shuffle stays in range with int64 ids."""
  out = _numbered_dir(tmp_path, (3,))
  fmt = prepare.RowFormat(SEQ, "uint16")
  huge = 2**31 + 9
  with open(os.path.join(out, "train-00001.bin"), "wb") as f:
    f.truncate(huge * fmt.row_bytes)                    # sparse: no disk blocks
    tok = np.arange(SEQ + 1) + 7
    f.seek((huge - 2) * fmt.row_bytes)
    f.write(fmt.encode(tok[None], (np.arange(SEQ + 1) == 4)[None]).tobytes())
  index = json.load(open(os.path.join(out, "index.json")))
  index["splits"]["train"]["shards"].append({"file": "train-00001.bin", "rows": huge, "tokens": 0})
  prepare.write_index(out, index)
  reader = shards.PreparedLMData.build(
      dataclasses.replace(tiny_experiment("unused.txt", seq=SEQ).data, prepared_dir=out)).readers["train"]
  assert reader.rows == huge + 3
  shard, offset = shards.locate(reader.offsets, np.array([2, 3, huge + 1]), fmt.row_bytes)
  assert shard.tolist() == [0, 1, 1] and offset.dtype == np.int64
  assert offset[2] == (huge - 2) * fmt.row_bytes > 2**32
  row = shards.decode_rows(reader.read(np.array([huge + 1], np.int64)), fmt)
  np.testing.assert_array_equal(row["inputs"][0], tok[:-1])
  np.testing.assert_array_equal(row["positions"][0], np.r_[np.arange(4), np.arange(SEQ - 4)])
  assert row["weights"][0].tolist() == [1.0] * 3 + [0.0] + [1.0] * (SEQ - 4)
  import tensorflow as tf
  n = 3 * 2**32 + 7                                      # the shuffle, with a fake row count
  k = tf.constant(np.arange(5 * n - 2048, 5 * n + 2048, dtype=np.int64))   # across an epoch seam
  ids = lm._shuffled(k, n, 0).numpy()
  assert ids.dtype == np.int64 and len(set(ids[:2048].tolist()) | set(ids[2048:].tolist())) > 4000
  assert ids.min() >= 0 and ids.max() < n and 0.5 < (ids > 2**32).mean() < 0.8


def test_object_storage_output(prepared, tmp_path):
  """An fsspec URL (memory://, as gs:// through gcsfs) is written and streamed alike."""
  cfg, local = prepared
  url = "memory://bigmodel-test/prep"
  prepare.prepare(cfg, url, workers=1)
  remote = _prepared_data(url)
  near = _prepared_data(local)
  for a, b in zip(remote.train_batches(8, 5).take(2).as_numpy_iterator(),
                  near.train_batches(8, 5).take(2).as_numpy_iterator()):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  with pytest.raises(DataError, match="already holds a prepared corpus"):
    prepare.prepare(cfg, url, workers=1)


def test_bad_prepared_dirs_give_clear_errors(prepared, tmp_path, capsys):
  cfg, good = prepared
  (tmp_path / "empty").mkdir()
  cases = {str(tmp_path / "nope"): "does not exist",
           str(tmp_path / "empty"): "has no index.json"}
  bad = tmp_path / "corrupt"
  bad.mkdir()
  (bad / "index.json").write_text('{"format": "bigmodel-lm-ro')
  cases[str(bad)] = "index.json is corrupt"
  cut = tmp_path / "cut"
  cut.mkdir()
  for name in os.listdir(good):
    (cut / name).write_bytes(open(os.path.join(good, name), "rb").read())
  with open(cut / "train-00000.bin", "r+b") as f:
    f.truncate(100)
  cases[str(cut)] = "train-00000.bin holds 100 bytes"
  for path, message in cases.items():
    with pytest.raises(DataError, match=message):
      lm.LMData.build(dataclasses.replace(cfg, prepared_dir=path))
  with pytest.raises(DataError, match="DataConfig.seq_len=32 but .* prepared with seq_len 16"):
    lm.LMData.build(dataclasses.replace(cfg, prepared_dir=good, seq_len=32))
  from bigmodel import cli
  rc = cli.main(["train", "--workdir", str(tmp_path / "w")] + [
      f"--gin.{b.replace(' = ', '=')}" for b in tiny_bindings("x.txt", seq=SEQ)] +
      [f"--gin.DataConfig.prepared_dir='{cut}'"])
  err = capsys.readouterr().err
  assert rc == 2 and "bigmodel train: error:" in err and "prepare the corpus again" in err


def test_cli_prepare_then_train(corpus, tmp_path, capsys):
  gin = [f"--gin.{b.replace(' = ', '=')}" for b in tiny_bindings(str(corpus), steps=4, seq=SEQ)]
  out = str(tmp_path / "prep")
  text = run_main(capsys, "data", "prepare", "--out", out, "--workers", "1", *gin)
  assert "train with --gin.DataConfig.prepared_dir" in text
  text = run_main(capsys, "train", "--workdir", str(tmp_path / "run"), *gin,
                  f"--gin.DataConfig.prepared_dir='{out}'")
  assert "final: step 4" in text
  summary = json.load(open(tmp_path / "run" / "summary.json"))
  assert np.isfinite(summary["validation_loss"])
  assert os.path.exists(tmp_path / "run" / "tokenizer.json")


@pytest.fixture
def gcs_emulator():
  """A GCS JSON API server on localhost (gcp-storage-emulator), bucket `shards`."""
  import socket
  import subprocess
  import sys
  import time
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  exe = os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
  proc = subprocess.Popen([exe, "start", "--port", str(port), "--in-memory", "--default-bucket",
                           "shards"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 30
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), 0.2).close()
      break
    except OSError:
      assert time.time() < deadline and proc.poll() is None, "the GCS emulator did not start"
      time.sleep(0.1)
  old = os.environ.get("STORAGE_EMULATOR_HOST")
  os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
  try:
    yield "gs://shards"
  finally:
    proc.terminate()
    proc.wait()
    if old is None:
      os.environ.pop("STORAGE_EMULATOR_HOST")
    else:
      os.environ["STORAGE_EMULATOR_HOST"] = old


@FORK_OK
def test_gs_prepare_and_stream_on_the_emulator(prepared, gcs_emulator):
  """gs:// through gcsfs against a real GCS API server: written by 2 workers, read by ranges."""
  import fsspec
  cfg, local = prepared
  url = gcs_emulator + "/prep"
  prepare.prepare(cfg, url, workers=2, chunk_mb=0.02)
  fs, path = fsspec.core.url_to_fs(url)
  names = {os.path.basename(p) for p in fs.ls(path)}
  assert {"index.json", "tokenizer.json", "train-00000.bin", "val-00000.bin"} <= names
  remote = _prepared_data(url)
  chunked = str(local) + "-chunked"
  if not os.path.exists(chunked):
    prepare.prepare(cfg, chunked, workers=1, chunk_mb=0.02)
  near = _prepared_data(chunked)
  assert remote.readers["train"].rows == near.readers["train"].rows
  for a, b in zip(remote.train_batches(8, 2, (2, 4)).take(2).as_numpy_iterator(),
                  near.train_batches(8, 2, (2, 4)).take(2).as_numpy_iterator()):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
