"""launch/sweep.py: grid and random expansion, resume (finished runs skipped, interrupted runs
resumed in their workdir), cluster plans, and aggregation + plots on two tiny real runs."""

from __future__ import annotations

import csv
import importlib.util
import json
import os

import pytest

from tests.helpers import ROOT, tiny_bindings

_spec = importlib.util.spec_from_file_location("sweep", ROOT / "launch" / "sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def test_grid_expansion_and_values():
  name, vals = sweep.parse_grid("ModelConfig.positions=['learned', 'rope']")
  assert (name, vals) == ("ModelConfig.positions", ["learned", "rope"])
  assert sweep.parse_grid("ModelConfig.norm=[layernorm,rmsnorm]")[1] == ["layernorm", "rmsnorm"]
  assert sweep.parse_grid("OptimConfig.learning_rate=[1e-3, 3e-4]")[1] == [1e-3, 3e-4]
  assert sweep.parse_grid("DataConfig.files=[['a.txt','b.txt'], ['c.txt']]")[1] == [["a.txt", "b.txt"], ["c.txt"]]
  for bad in ("X=1,2", "=[1]", "X=[]"):
    with pytest.raises(SystemExit):
      sweep.parse_grid(bad)
  grid = [sweep.parse_grid("A.x=[1,2,3]"), sweep.parse_grid("B.y=[a,b]")]
  runs = sweep.expand(grid)
  assert len(runs) == 6 and runs[0] == {"A.x": 1, "B.y": "a"} and runs[-1] == {"A.x": 3, "B.y": "b"}
  plan = sweep.make_plan(["r.gin"], ["TRAIN_STEPS=5"], grid, [], 0, 0)
  assert [r["name"] for r in plan["runs"]][:2] == ["000_x=1,y=a", "001_x=1,y=b"]
  assert plan["runs"][1]["bindings"] == ["A.x=1", "B.y='b'"]
  assert plan["swept"] == ["A.x", "B.y"]
  assert sweep.gin_value(1e-4) == "0.0001" and sweep.gin_value(2.0) == "2.0" and sweep.gin_value(True) == "True"


def test_random_search_is_seeded_and_in_range():
  ranges = [sweep.parse_range("OptimConfig.learning_rate=loguniform(1e-4,1e-2)"),
            sweep.parse_range("OptimConfig.warmup_steps=int(10,20)"),
            sweep.parse_range("ModelConfig.norm=choice(layernorm,rmsnorm)"),
            sweep.parse_range("OptimConfig.b2=uniform(0.9,0.99)")]
  grid = [sweep.parse_grid("ModelConfig.positions=[learned,rope]")]
  a = sweep.expand(grid, ranges, samples=5, seed=3)
  assert a == sweep.expand(grid, ranges, samples=5, seed=3) != sweep.expand(grid, ranges, 5, seed=4)
  assert len(a) == 10 and {r["ModelConfig.positions"] for r in a} == {"learned", "rope"}
  for r in a:
    assert 1e-4 <= r["OptimConfig.learning_rate"] <= 1e-2 and 10 <= r["OptimConfig.warmup_steps"] <= 20
    assert r["ModelConfig.norm"] in ("layernorm", "rmsnorm") and 0.9 <= r["OptimConfig.b2"] <= 0.99
  for bad in ("X=normal(0,1)", "X=loguniform(0,1)", "X=int(1)"):
    with pytest.raises(SystemExit):
      sweep.parse_range(bad)


def _fake_finished(wd, loss=1.0):
  os.makedirs(wd, exist_ok=True)
  with open(os.path.join(wd, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 5, "loss": loss + 0.5}) + "\n")
    f.write(json.dumps({"step": 5, "split": "validation", "loss": loss, "accuracy": 0.3}) + "\n")
  with open(os.path.join(wd, "summary.json"), "w") as f:
    json.dump({"step": 5, "validation_loss": loss, "tokens_per_sec": 1000.0}, f)


def test_resume_skips_finished_and_resumes_interrupted(tmp_path):
  d = str(tmp_path / "sw")
  plan = sweep.write_plan(d, sweep.make_plan(["r.gin"], ["TRAIN_STEPS=5"],
                                             [sweep.parse_grid("A.x=[1,2,3]")], [], 0, 0))
  done, interrupted, fresh = plan["runs"]
  _fake_finished(sweep.workdir(d, done))
  open(os.path.join(sweep.workdir(d, done), sweep.DONE), "w").close()
  os.makedirs(os.path.join(sweep.workdir(d, interrupted), "checkpoints", "3"))   # killed at step 3
  calls = []

  def runner(cmd, wd):
    calls.append((cmd, wd))
    assert os.path.isdir(wd)
    if wd.endswith(interrupted["name"]):
      assert os.path.isdir(os.path.join(wd, "checkpoints", "3"))   # same workdir: train resumes
    _fake_finished(wd, loss=2.0)
    return 0

  logs = []
  status = sweep.run_all(d, plan, runner=runner, log=logs.append)
  assert status == {done["name"]: "skipped", interrupted["name"]: "done", fresh["name"]: "done"}
  assert [os.path.basename(wd) for _, wd in calls] == [interrupted["name"], fresh["name"]]
  assert any("resuming from its checkpoints" in s for s in logs)
  cmd = calls[0][0]
  assert cmd[1:4] == ["-m", "bigmodel", "train"] and "--gin_file=r.gin" in cmd
  assert cmd[-2:] == ["--gin.TRAIN_STEPS=5", "--gin.A.x=2"]
  # A failed run is not marked done and is tried again next time; finished ones never.
  calls.clear()
  os.remove(os.path.join(sweep.workdir(d, fresh), sweep.DONE))
  status = sweep.run_all(d, plan, runner=lambda c, w: calls.append(w) or 1, log=logs.append)
  assert status[fresh["name"]] == "failed (rc 1)" and len(calls) == 1
  assert not sweep.is_finished(d, fresh)
  # The same plan is accepted again; a different one in the same directory is refused.
  sweep.write_plan(d, sweep.make_plan(["r.gin"], ["TRAIN_STEPS=5"], [sweep.parse_grid("A.x=[1,2,3]")], [], 0, 0))
  with pytest.raises(SystemExit, match="different sweep"):
    sweep.write_plan(d, sweep.make_plan(["r.gin"], ["TRAIN_STEPS=6"], [sweep.parse_grid("A.x=[1,2,3]")], [], 0, 0))


def test_emit_slurm_array_and_tpu_commands(tmp_path):
  d = str(tmp_path / "sw")
  rc = sweep.main(["emit", "--dir", d, "--target", "slurm", "--recipe", "experiments/gpt_shakespeare_char.gin",
                   "--grid", "ModelConfig.positions=[learned,rope]", "--grid", "ModelConfig.norm=[layernorm,rmsnorm]",
                   "--parallel", "2", "--gin.TRAIN_STEPS=300"])
  assert rc == 0
  text = open(os.path.join(d, "slurm_array.sbatch")).read()
  assert "#SBATCH --array=0-3%2" in text and "run-one" in text and "$SLURM_ARRAY_TASK_ID" in text
  assert sweep.main(["emit", "--dir", d, "--target", "tpu"]) == 0      # the plan on disk
  lines = [l for l in open(os.path.join(d, "tpu_commands.sh")) if l.startswith("WORKDIR=")]
  assert len(lines) == 4 and "launch/tpu_pod.sh experiments/gpt_shakespeare_char.gin" in lines[3]
  assert "--gin.TRAIN_STEPS=300" in lines[3] and "--gin.ModelConfig.norm='\"'\"'rmsnorm'\"'\"'" in lines[3]


@pytest.mark.slow
def test_aggregate_and_plots_on_two_tiny_real_runs(tmp_path, text_corpus, monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)      # the runs use one CPU device
  recipe = tmp_path / "tiny.gin"
  recipe.write_text("\n".join(tiny_bindings(text_corpus, steps=6, batch=4, seq=16)) + "\n")
  d = str(tmp_path / "sw")
  rc = sweep.main(["run", "--dir", d, "--recipe", str(recipe), "--grid", "ModelConfig.norm=[layernorm,rmsnorm]",
                   "--gin.TrainConfig.eval_every=3", "--gin.ModelConfig.num_layers=1"])
  assert rc == 0, open(os.path.join(d, "runs", "000_norm=layernorm", "train.log")).read()
  rows = list(csv.DictReader(open(os.path.join(d, "results.csv"))))
  assert sorted(r["ModelConfig.norm"] for r in rows) == ["layernorm", "rmsnorm"]
  for r in rows:
    assert r["status"] == "finished" and r["step"] == "6"
    assert float(r["final_validation_loss"]) >= float(r["best_validation_loss"]) > 0
    assert float(r["final_train_loss"]) > 0 and float(r["tokens_per_sec"]) > 0
    assert 0 <= float(r["final_validation_accuracy"]) <= 1
  losses = [float(r["final_validation_loss"]) for r in rows]
  assert losses == sorted(losses)
  md = open(os.path.join(d, "results.md")).read()
  assert md.startswith("| run | norm | final_validation_loss | best_validation_loss | final_train_loss |")
  assert md.count("\n") == 4
  for png in ("loss_curves.png", "vs_norm.png"):
    path = os.path.join(d, "plots", png)
    assert os.path.getsize(path) > 10_000 and open(path, "rb").read(4) == b"\x89PNG"
  # Running the same command again trains nothing.
  assert sweep.main(["run", "--dir", d, "--no_plots"]) == 0
  for run in sweep.load_plan(d)["runs"]:
    log = open(os.path.join(sweep.workdir(d, run), "train.log")).read()
    assert log.count("$ ") == 1
