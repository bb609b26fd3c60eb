"""Training end to end: exact resume (clean stop and kill -9), determinism, the CLI,
multi-process, and bad input."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import pytest

from bigmodel import cli, config
from bigmodel.train import hooks, loop
from tests.helpers import ROOT, cli as run_cli, gin_args, run_main, tiny_bindings, train_losses


def _train(corpus, workdir, hooks=(), **kw):
  exp = config.load([], tiny_bindings(corpus, **kw))
  return loop.train(exp, str(workdir), config.operative_config(), hooks=hooks)


def test_exact_resume_and_determinism(text_corpus, tmp_path):
  kw = dict(steps=8, **{"TrainConfig.checkpoint_every": 2, "ModelConfig.dropout": 0.1})
  _train(text_corpus, tmp_path / "a", **kw)
  _train(text_corpus, tmp_path / "b", **kw, **{"TrainConfig.stop_after": 4})
  assert sorted(train_losses(tmp_path / "b")) == [1, 2, 3, 4]
  summary = _train(text_corpus, tmp_path / "b", **kw)            # resumes at step 4
  assert summary["step"] == 8
  _train(text_corpus, tmp_path / "c", **kw)
  # SIGTERM during step 5 (from a hook of the caller's): a checkpoint at step 6, then resume
  summary = _train(text_corpus, tmp_path / "d", hooks=[_SignalAt(5)], **kw)
  assert summary["preempted"] and summary["step"] == 6
  assert sorted(p.name for p in (tmp_path / "d" / "checkpoints").iterdir()) == ["2", "4", "6"]
  assert _train(text_corpus, tmp_path / "d", **kw)["step"] == 8
  a, b, c, d = (train_losses(tmp_path / x) for x in "abcd")
  assert sorted(a) == list(range(1, 9))
  assert a == b, "resumed run differs from the uninterrupted one"
  assert a == c, "two identical runs differ"
  assert a == d, "run resumed after a preemption differs from the uninterrupted one"
  assert a[8] < a[1]


class _SignalAt(hooks.Hook):
  """Sends this process a SIGTERM after step `at`, as a scheduler would."""

  def __init__(self, at):
    self.at = at

  def due(self, step, last):
    return step == self.at

  def __call__(self, run, step):
    os.kill(os.getpid(), signal.SIGTERM)


def test_resume_after_kill_9_during_async_save(text_corpus, tmp_path, capsys):
  """kill -9 while an async checkpoint is being written: the partial one is ignored, the run
  resumes from the newest complete one and matches an uninterrupted run."""
  steps, every = 120, 10
  extra = {"TrainConfig.checkpoint_every": every, "TrainConfig.async_checkpoints": True}
  bindings = tiny_bindings(text_corpus, steps=steps, **extra)
  workdir = tmp_path / "killed"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-m", "bigmodel", "train", f"--workdir={workdir}",
                           *gin_args(bindings)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  ckpt_dir = workdir / "checkpoints"
  deadline = time.time() + 400
  killed_in = None     # the temporary folder of the save in flight when killed
  while time.time() < deadline and proc.poll() is None:
    names = os.listdir(ckpt_dir) if ckpt_dir.is_dir() else []
    partial = [n for n in names if ".orbax-checkpoint-tmp" in n and int(n.split(".")[0]) >= 40]
    if partial:
      proc.send_signal(signal.SIGKILL)
      killed_in = partial[0]
      break
  proc.wait()
  assert killed_in is not None, f"no async save was caught in flight: {proc.stderr.read()[-2000:]}"
  partial_step = int(killed_in.split(".")[0])
  done = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
  assert done and max(done) < partial_step and partial_step not in done, (done, killed_in)
  run_main(capsys, "train", f"--workdir={workdir}", *gin_args(bindings))     # resumes
  _train(text_corpus, tmp_path / "clean", steps=steps, **extra)
  resumed, clean = train_losses(workdir), train_losses(tmp_path / "clean")
  assert sorted(resumed) == list(range(1, steps + 1))
  assert resumed == clean
  assert not [n for n in os.listdir(ckpt_dir) if "tmp" in n], "the partial save was not cleaned up"


def test_cli_end_to_end(text_corpus, tmp_path, capsys):
  workdir = tmp_path / "run"
  bindings = tiny_bindings(text_corpus, steps=40, **{"TrainConfig.checkpoint_every": 20,
                                                     "TrainConfig.eval_every": 20,
                                                     "OptimConfig.learning_rate": 3e-3})
  out = run_cli(["train", f"--workdir={workdir}", *gin_args(bindings)]).stdout
  assert "final: step 40" in out and "tokens/s" in out and "MFU" in out
  assert (workdir / "config.gin").read_text().count("ModelConfig.d_model = 32") == 1
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  train = [r for r in records if "split" not in r]
  evals = [r for r in records if r.get("split") == "validation"]
  assert {"step", "loss", "learning_rate", "grad_norm", "tokens_per_sec", "mfu"} <= set(train[5])
  # tokens/s counts the batch's token positions (8 rows x 16) per timed step
  timed = [r for r in train if "tokens_per_sec" in r]
  assert len(timed) >= 30
  for r in timed:
    assert r["tokens_per_sec"] * r["step_time"] == pytest.approx(8 * 16, rel=1e-6), r
  assert [r["step"] for r in evals] == [20, 40] and all("loss" in r for r in evals)
  first, last = sum(r["loss"] for r in train[:3]) / 3, sum(r["loss"] for r in train[-3:]) / 3
  assert last < first - 1.0, (first, last)
  assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit()) == ["20", "40"]
  # eval and sample read the run's config.gin and tokenizer (in this process: the train above
  # is the one started as a new user starts it)
  result = json.loads(run_main(capsys, "eval", f"--workdir={workdir}"))
  assert result["step"] == 40 and abs(result["loss"] - evals[-1]["loss"]) < 1e-4
  assert result["perplexity"] > 1
  text = run_main(capsys, "sample", f"--workdir={workdir}", "--prompt", "the king", "--num_tokens", "30",
                  "--temperature", "0.8", "--top_k", "5")
  assert text.startswith("the king") and len(text.strip()) > len("the king")


def _launch(workdir, logs, bindings, wait=True):
  env = dict(os.environ, PYTHON=sys.executable, LOG_DIR=str(logs))
  cmd = ["bash", "launch/local_multiprocess.sh", "-n", "2", "-d", "4", "--", "train",
         f"--workdir={workdir}", *gin_args(bindings)]
  if wait:
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def _steps_so_far(workdir) -> int:
  try:
    return max(train_losses(workdir) or [0])
  except (OSError, ValueError):     # not there yet, or a line half written
    return 0


def test_multiprocess_matches_single_process_preempts_and_samples(text_corpus, tmp_path, capsys):
  """2 processes x 4 devices, preempted and resumed: a SIGTERM to one process at a random step
  makes both save at the same next step and exit 75; the resumed run ends with the sample (every
  process gathers the params, process 0 generates), and its losses, before and after the stop,
  equal one process's uninterrupted run (single-process resume is bitwise: see
  test_exact_resume_and_determinism)."""
  import random
  steps = 30
  bindings = tiny_bindings(text_corpus, steps=steps, **{
      "MeshConfig.data": 2, "MeshConfig.fsdp": 2, "MeshConfig.tensor": 2,
      "TrainConfig.sample_len": 12, "TrainConfig.sample_prompt": "the king"})
  single = tmp_path / "single"
  run_main(capsys, "train", f"--workdir={single}", *gin_args(bindings))      # 8 devices here
  work, logs = tmp_path / "preempted", tmp_path / "plogs"
  signal_at = random.Random().randint(3, 15)
  proc = _launch(work, logs, bindings, wait=False)
  deadline, sent = time.time() + 240, None
  while time.time() < deadline and proc.poll() is None and sent is None:
    done = _steps_so_far(work)
    if done >= signal_at:
      sent = done
      os.kill(int((logs / "proc_1.pid").read_text()), signal.SIGTERM)   # one process only
    time.sleep(0.005)
  out, err = proc.communicate(timeout=240)
  assert sent is not None, f"the run ended before step {signal_at}: {out} {err}"
  assert proc.returncode == 75, f"signal after step {sent}: exit {proc.returncode}\n{out}\n{err}"
  stops = {int(re.search(r"preempted: checkpoint at step (\d+)", (logs / f"proc_{i}.log").read_text())[1])
           for i in (0, 1)}
  assert len(stops) == 1, stops                   # both processes saved the same step
  stop = stops.pop()
  assert sent <= stop < steps
  assert max(int(p.name) for p in (work / "checkpoints").iterdir() if p.name.isdigit()) == stop
  proc = _launch(work, logs, bindings)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  log0 = (logs / "proc_0.log").read_text()
  assert f"resumed from {work / 'checkpoints'} step {stop}" in log0
  assert "'data': 2, 'fsdp': 2, 'tensor': 2" in log0
  sample = json.loads((work / "summary.json").read_text())["sample"]
  assert sample.startswith("the king") and len(sample) > len("the king") and sample in log0
  a, b = train_losses(single), train_losses(work)
  assert sorted(a) == sorted(b) == list(range(1, steps + 1))
  for step in a:
    assert b[step] == pytest.approx(a[step], rel=1e-5), step
  assert (work / "checkpoints" / str(steps)).exists()


# --- bad input: a clear message, a nonzero exit, and no checkpoint overwritten -------------

def _main(capsys, args):
  code = cli.main(args)
  err = capsys.readouterr().err
  return code, err


def test_misspelled_binding(capsys, text_corpus, tmp_path):
  code, err = _main(capsys, ["train", f"--workdir={tmp_path}", *gin_args(tiny_bindings(text_corpus)),
                             "--gin.TrainConfig.train_stepz=5"])
  assert code == 2 and "train_stepz" in err and "--gin.TrainConfig.train_stepz" in err
  bad = tmp_path / "bad.gin"
  bad.write_text("include 'sizes/gpt_nano.gin'\nModelConfg.d_model = 3\n")
  code, err = _main(capsys, ["train", f"--workdir={tmp_path}", f"--gin_file={bad}"])
  assert code == 2 and "ModelConfg" in err and "bad.gin" in err
  assert not (tmp_path / "checkpoints").exists()


def test_required_value_missing(capsys, tmp_path):
  code, err = _main(capsys, ["train", f"--workdir={tmp_path}",
                             "--gin_file=experiments/runs/pretrain_lm.gin"])
  assert code == 2 and ("TRAIN_STEPS" in err or "required" in err.lower()), (code, err)


def test_missing_data_file(capsys, text_corpus, tmp_path):
  b = tiny_bindings(text_corpus) + ["DataConfig.files = ['/nonexistent/corpus.txt']"]
  code, err = _main(capsys, ["train", f"--workdir={tmp_path / 'w'}", *gin_args(b)])
  assert code == 2 and "/nonexistent/corpus.txt" in err
  assert not (tmp_path / "w" / "checkpoints").exists() or not any((tmp_path / "w" / "checkpoints").iterdir())


def test_batch_not_divisible(capsys, text_corpus, tmp_path):
  code, err = _main(capsys, ["train", f"--workdir={tmp_path}", *gin_args(tiny_bindings(text_corpus, batch=12))])
  assert code == 2 and "not divisible by the data-parallel size 8" in err


def test_empty_dataset(capsys, tmp_path):
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  code, err = _main(capsys, ["train", f"--workdir={tmp_path / 'w'}", *gin_args(tiny_bindings(empty))])
  assert code == 2 and "empty" in err


def _snapshot(directory: pathlib.Path):
  return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
          for p in directory.rglob("*") if p.is_file()}


def test_workdir_of_a_different_model(capsys, text_corpus, tmp_path):
  _train(text_corpus, tmp_path, steps=2)
  before = _snapshot(tmp_path / "checkpoints")
  code, err = _main(capsys, ["train", f"--workdir={tmp_path}",
                             *gin_args(tiny_bindings(text_corpus, steps=4) + ["ModelConfig.d_model = 64"])])
  assert code == 2 and "does not match this model" in err
  assert "params/blocks/layers/attn/out_bias: checkpoint (2, 32) vs model (2, 64)" in err
  assert _snapshot(tmp_path / "checkpoints") == before


def test_corrupt_checkpoint(capsys, text_corpus, tmp_path):
  _train(text_corpus, tmp_path, steps=2)
  for f in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
      f.write_bytes(b"garbage")
  code, err = _main(capsys, ["train", f"--workdir={tmp_path}", *gin_args(tiny_bindings(text_corpus, steps=4))])
  assert code == 2 and "corrupt" in err
