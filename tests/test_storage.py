"""Object-storage workdirs against a real GCS JSON API server on localhost
(gcp-storage-emulator, in memory, started and stopped here): train, stop, resume, eval and
sample with a gs:// workdir and gs:// data, then every artifact is in the bucket and
nothing was written to local disk."""

import contextlib
import json
import logging
import os
import socket

import pytest

from bigmodel import storage
from tests.helpers import gin_args, run_main, tiny_bindings

BUCKET = "bigmodel-test"


def _free_port() -> int:
  with contextlib.closing(socket.socket()) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _with_generation_headers(server_module):
  """Media downloads answer with the object's generation headers, as GCS does.

  gcp-storage-emulator 2026.7.19 leaves out `x-goog-generation` on downloads; tensorstore's
  OCDBT store (orbax's array format) reads a manifest, then rewrites it on condition of that
  generation, and fails ("Malformed StorageGeneration") without it. Real GCS sends it."""
  from gcp_storage_emulator.handlers import objects
  original = objects.download

  def download(request, response, storage_, *args, **kwargs):
    original(request, response, storage_, *args, **kwargs)
    try:
      obj = storage_.get_file_obj(request.params["bucket_name"], request.params["object_id"])
    except Exception:      # not found: the 404 stands
      return
    response["x-goog-generation"] = str(obj["generation"])
    response["x-goog-metageneration"] = str(obj.get("metageneration", "1"))

  before = server_module.HANDLERS
  objects.download = download          # what objects.get calls for ?alt=media
  server_module.HANDLERS = tuple(
      (regex, {m: (download if h is original else h) for m, h in handlers.items()})
      for regex, handlers in server_module.HANDLERS)

  def undo():
    objects.download, server_module.HANDLERS = original, before
  return undo


@pytest.fixture(scope="module")
def gcs():
  """A GCS API server on a free port with one bucket; STORAGE_EMULATOR_HOST points at it."""
  from gcp_storage_emulator import server as server_module
  from gcp_storage_emulator.server import create_server
  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)
  undo_patch = _with_generation_headers(server_module)
  port = _free_port()
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  server.start()
  saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL")}
  os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
  storage.configure()
  yield f"gs://{BUCKET}"
  server.stop()
  undo_patch()
  for k, v in saved.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
  storage.configure()


def _bucket_files(root: str) -> list[str]:
  fs, p = storage.filesystem(root)
  prefix = p.split("://", 1)[1] + "/"
  return sorted(f[len(prefix):] for f in fs.find(p))


def _losses(workdir) -> dict[int, float]:
  losses = {}
  for line in storage.read_text(storage.join(workdir, "metrics.jsonl")).splitlines():
    rec = json.loads(line)
    if "split" not in rec:
      losses[rec["step"]] = rec["loss"]
  return losses


def test_gs_workdir_end_to_end(gcs, text_corpus, tmp_path, capsys, monkeypatch):
  data = f"{gcs}/data/corpus.txt"
  storage.write_bytes(data, text_corpus.read_bytes())
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  run = f"{gcs}/runs/tiny"
  bindings = tiny_bindings(data, steps=6, **{"TrainConfig.checkpoint_every": 2,
                                             "TrainConfig.async_checkpoints": True})
  run_main(capsys, "train", f"--workdir={run}", *gin_args(bindings), "--gin.TrainConfig.stop_after=4")
  assert sorted(_losses(run)) == [1, 2, 3, 4]
  out = run_main(capsys, "train", f"--workdir={run}", "--gin.TrainConfig.stop_after=0")  # its config.gin
  assert f"resumed from {run}/checkpoints step 4" in out and "final: step 6" in out
  # the same losses as a local, uninterrupted run of the same config
  local = tmp_path / "local"
  run_main(capsys, "train", f"--workdir={local}", *gin_args(bindings))
  gs_losses, local_losses = _losses(run), _losses(local)
  assert sorted(gs_losses) == list(range(1, 7)) and gs_losses == local_losses
  result = json.loads(run_main(capsys, "eval", f"--workdir={run}"))
  assert result["step"] == 6 and result["perplexity"] > 1
  text = run_main(capsys, "sample", f"--workdir={run}", "--prompt", "the king", "--num_tokens", "8")
  assert text.startswith("the king")

  files = _bucket_files(run)
  for name in ("config.gin", "metrics.jsonl", "summary.json", "tokenizer.json"):
    assert name in files, files
  assert any(f.startswith("tensorboard/events.out.tfevents.") for f in files), files
  steps = {f.split("/")[1] for f in files if f.startswith("checkpoints/")}
  assert steps == {"2", "4", "6"}, steps
  assert "checkpoints/6/state/_METADATA" in files
  assert json.loads(storage.read_text(f"{run}/summary.json"))["step"] == 6
  events = [f for f in files if f.startswith("tensorboard/")]
  assert sum(_event_scalars(f"{run}/{f}") for f in events) >= 6 * 4    # loss, lr, norms per step
  # Hugging Face export and import, bucket to bucket
  out = json.loads(run_main(capsys, "convert", "to-hf", f"--checkpoint={run}", f"--out={gcs}/hf"))
  assert out["files"][:2] == ["config.json", "model.safetensors"]
  assert {"config.json", "model.safetensors"} <= set(_bucket_files(f"{gcs}/hf"))
  out = json.loads(run_main(capsys, "convert", "from-hf", f"--model_dir={gcs}/hf",
                            f"--out={gcs}/imported"))
  assert out["workdir"] == f"{gcs}/imported" and "checkpoints/0/state/_METADATA" in _bucket_files(out["workdir"])
  # nothing on local disk: the working directory stays empty (no `gs:` folder)
  assert list(cwd.iterdir()) == []
  assert not (tmp_path / "gs:").exists()


def _event_scalars(path: str) -> int:
  """Scalar summaries in a TensorBoard event file (TFRecord framing parsed here)."""
  import struct
  from tensorboardX.proto import event_pb2
  data, n, pos = storage.read_bytes(path), 0, 0
  while pos < len(data):
    (length,) = struct.unpack("<Q", data[pos:pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
    n += len(event.summary.value)
    pos += 12 + length + 4
  return n


def test_storage_layer_paths(gcs, tmp_path):
  """The path layer's own contract on both kinds of path."""
  for root in (str(tmp_path / "local"), f"{gcs}/layer"):
    f = storage.join(root, "a", "b.txt")
    storage.write_text(f, "hello\n")
    assert storage.exists(f) and storage.isfile(f) and not storage.isdir(f)
    assert storage.read_text(f) == "hello\n"
    assert storage.listdir(storage.join(root, "a")) == ["b.txt"]
    assert storage.glob(storage.join(root, "a", "*.txt")) == [f]
    app = storage.AppendFile(storage.join(root, "log.jsonl"), flush_secs=0)
    app.write("1\n")
    app.flush()
    app.close()
    app = storage.AppendFile(storage.join(root, "log.jsonl"), flush_secs=3600)
    app.write("2\n")
    app.close()                                   # close always writes
    assert storage.read_text(storage.join(root, "log.jsonl")) == "1\n2\n"
    storage.move(storage.join(root, "a"), storage.join(root, "moved", "a"))
    assert not storage.exists(f) and storage.read_text(storage.join(root, "moved", "a", "b.txt")) == "hello\n"
    assert storage.listdir(storage.join(root, "missing")) == []
  assert storage.absolute("gs://b/run/") == "gs://b/run"
  assert storage.absolute("run") == os.path.join(os.getcwd(), "run")
  with pytest.raises(ValueError, match="cannot append"):
    storage.open(f"{gcs}/x.txt", "a")


def test_emulator_settings_and_sentencepiece_on_gs(gcs, text_corpus, capsys, monkeypatch, tmp_path):
  """The libraries' settings come from STORAGE_EMULATOR_HOST alone; a SentencePiece model is
  trained from and written to the bucket, and a run loads it from there."""
  assert os.environ["TENSORSTORE_GCS_HTTP_URL"] == os.environ["STORAGE_EMULATOR_HOST"]
  assert os.environ["EPATH_USE_TF"] == "0"
  src = f"{gcs}/sp/corpus.txt"
  storage.write_bytes(src, text_corpus.read_bytes())
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  out = run_main(capsys, "tokenizer", "train", "--input", src, "--vocab_size", "40",
                 "--model_type", "bpe", "--out", f"{gcs}/sp/tok")
  assert f"wrote {gcs}/sp/tok.model (40 pieces)" in out
  assert {"tok.model", "tok.vocab"} <= set(storage.listdir(f"{gcs}/sp"))
  from bigmodel.data import tokenizers
  tok = tokenizers.build(f"{gcs}/sp/tok.model")
  tok.save(f"{gcs}/sp/run")
  again = tokenizers.load(f"{gcs}/sp/run")
  assert again.encode("the king") == tok.encode("the king") and again.vocab_size == 40
  assert list(cwd.iterdir()) == []
