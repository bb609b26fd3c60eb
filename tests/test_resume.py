"""Resuming a run: a changed configuration is refused (or accepted by name), a different
mesh continues with the same losses, and a corrupt latest checkpoint falls back to the
newest good one. Runs are in-process CLI calls on a tiny model; one uninterrupted
reference run is shared."""

import json
import logging
import pathlib
import random

import pytest

from bigmodel import cli
from tests.helpers import gin_args, run_main, tiny_bindings, train_losses

STEPS = 6
OTHER_MESH = ["--gin.MeshConfig.data=2", "--gin.MeshConfig.fsdp=2", "--gin.MeshConfig.tensor=2"]
# A different mesh sums in a different order: losses agree to float32 rounding, not bitwise.
MESH_RTOL = 1e-6     # the measured difference is in the README
GO_ON = "--gin.TrainConfig.stop_after=0"    # the run's config.gin keeps the first run's stop_after


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(bindings, losses of an uninterrupted 6-step run, its tmp dir) on the default mesh."""
  root = tmp_path_factory.mktemp("resume")
  rng = random.Random(1)
  words = "the king queen lord lady sword crown castle night day love war peace".split()
  corpus = root / "corpus.txt"
  corpus.write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(40)) + "."
                                for _ in range(60)) + "\n")
  bindings = tiny_bindings(corpus, steps=STEPS, **{"TrainConfig.checkpoint_every": 2})
  assert cli.main(["train", f"--workdir={root / 'reference'}", *gin_args(bindings)]) == 0
  return bindings, train_losses(root / "reference"), root


def _snapshot(directory: pathlib.Path):
  return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in directory.rglob("*") if p.is_file()}


def _main(capsys, *args):
  capsys.readouterr()
  code = cli.main(list(args))
  out = capsys.readouterr()
  return code, out.out + out.err


def test_resume_on_another_mesh(reference, capsys):
  bindings, ref, root = reference
  work = root / "mesh"
  run_main(capsys, "train", f"--workdir={work}", *gin_args(bindings), "--gin.TrainConfig.stop_after=2")
  out = run_main(capsys, "train", f"--workdir={work}", *gin_args(bindings), *OTHER_MESH, GO_ON)
  assert "'data': 2, 'fsdp': 2, 'tensor': 2" in out and f"final: step {STEPS}" in out
  losses = train_losses(work)
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert [losses[s] for s in (1, 2)] == [ref[s] for s in (1, 2)]
  for s in range(3, STEPS + 1):
    assert losses[s] == pytest.approx(ref[s], rel=MESH_RTOL), (s, losses[s], ref[s])


def test_corrupt_latest_checkpoint_falls_back(reference, capsys, caplog):
  bindings, ref, root = reference
  work = root / "corrupt"
  run_main(capsys, "train", f"--workdir={work}", *gin_args(bindings), "--gin.TrainConfig.stop_after=4")
  for f in (work / "checkpoints" / "4" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
      f.write_bytes(b"garbage")
  with caplog.at_level(logging.WARNING, logger="bigmodel.train.checkpoint"):
    out = run_main(capsys, "train", f"--workdir={work}", *gin_args(bindings), GO_ON)
  assert "step 4 is unusable" in caplog.text and "corrupt" in caplog.text
  assert "checkpoints step 2" in out and f"final: step {STEPS}" in out
  assert [p.name.split("-")[0] for p in (work / "checkpoints.bad").iterdir()] == ["4"]
  assert train_losses(work) == ref              # same mesh: bitwise
  assert sorted(p.name for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4", "6"]


def test_no_good_checkpoint_is_refused(reference, capsys):
  bindings, _, root = reference
  work = root / "all_corrupt"
  run_main(capsys, "train", f"--workdir={work}", *gin_args(bindings), "--gin.TrainConfig.stop_after=2")
  for f in (work / "checkpoints").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name and "/state/" in str(f):
      f.write_bytes(b"garbage")
  before = _snapshot(work)
  code, err = _main(capsys, "train", f"--workdir={work}", *gin_args(bindings), GO_ON)
  assert code == 2 and "no checkpoint in" in err and "step 2:" in err and "corrupt" in err
  assert _snapshot(work) == before


def test_changed_config_is_refused_unless_allowed(reference, capsys, caplog, tmp_path):
  bindings, _, root = reference
  work = root / "changed"
  run_main(capsys, "train", f"--workdir={work}", *gin_args(bindings), "--gin.TrainConfig.stop_after=2")
  before = _snapshot(work)
  code, err = _main(capsys, "train", f"--workdir={work}", *gin_args(bindings),
                    "--gin.TrainConfig.batch_size=16")
  assert code == 2 and "batch_size: checkpoint 8, now 16" in err and "--allow_changed=batch_size" in err
  code, err = _main(capsys, "train", f"--workdir={work}", *gin_args(bindings),
                    "--gin.DataConfig.seq_len=32", "--gin.DataConfig.seed=1", "--gin.TrainConfig.seed=3")
  assert code == 2 and "seq_len: checkpoint 16, now 32" in err
  assert "data_seed: checkpoint 0, now 1" in err and "seed: checkpoint 0, now 3" in err
  other = tmp_path / "other.txt"
  other.write_text(pathlib.Path(bindings[6].split("'")[1]).read_text() + "one more line.\n")
  code, err = _main(capsys, "train", f"--workdir={work}", *gin_args(bindings),
                    f"--gin.DataConfig.files=['{other}']")
  assert code == 2 and "data: checkpoint '1 files, sha256:" in err
  code, err = _main(capsys, "train", f"--workdir={work}", *gin_args(bindings),
                    "--gin.TrainConfig.batch_size=16", "--allow_changed=batchsize")
  assert code == 2 and "unknown field(s)" in err and "batch_size" in err
  assert _snapshot(work) == before, "a refused resume changed the workdir"
  with caplog.at_level(logging.WARNING, logger="bigmodel.train.checkpoint"):
    out = run_main(capsys, "train", f"--workdir={work}", *gin_args(bindings),
                   "--gin.TrainConfig.batch_size=16", "--allow_changed=batch_size", GO_ON)
  assert "batch_size changed from 8 to 16 (--allow_changed)" in caplog.text
  assert "skipped or repeated" in caplog.text and f"final: step {STEPS}" in out
  meta = json.loads((work / "checkpoints" / str(STEPS) / "meta" / "metadata").read_text())
  assert meta["run"]["batch_size"] == 16          # the new identity is what a later resume checks
