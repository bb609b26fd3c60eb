#!/usr/bin/env python3
"""Ablation sweeps: a base recipe, a grid and/or random search, one workdir per run, one table.

    python launch/sweep.py run --recipe experiments/gpt_shakespeare_char.gin --dir out/sweeps/pos_norm \\
        --grid "ModelConfig.positions=['learned','rope']" --grid "ModelConfig.norm=[layernorm,rmsnorm]" \\
        --gin.TRAIN_STEPS=300 --gin.EVAL_EVERY=100
    python launch/sweep.py run --recipe R.gin --dir out/sweeps/lr --samples 8 \\
        --range "OptimConfig.learning_rate=loguniform(1e-4,3e-3)" --range "OptimConfig.warmup_steps=int(10,200)"
    python launch/sweep.py emit --dir out/sweeps/pos_norm --target slurm   # or tpu (same args as run)
    python launch/sweep.py aggregate --dir out/sweeps/pos_norm            # CSV, markdown, plots

Grid values are Python literals (`[1e-3, 3e-4]`, `['rope', 'learned']`); a bare word is a
string. `--range NAME=KIND(a,b)` with KIND uniform, loguniform, int (inclusive) or
choice(v1,v2,...) is drawn `--samples` times (seeded by `--seed`), crossed with the grid.
`--gin.NAME=VALUE` binds a value in every run.

Running (`run`): each run gets `DIR/runs/NNN_<params>/` and is `bigmodel train` with the
recipe, the fixed bindings and its own; local runs go one at a time, their output in the
run's train.log. The plan is written to DIR/sweep.json first; running the same command
again (or `run --dir DIR` alone) skips finished runs (a `.done` marker beside their
summary.json) and resumes interrupted ones from their checkpoints (`bigmodel train` on an
existing workdir resumes). `emit` writes the same plan as a SLURM job array
(DIR/slurm_array.sbatch, one array task per run via `run-one`) or a TPU command list
(DIR/tpu_commands.sh, one `launch/tpu_pod.sh` line per run).

Results (`aggregate`, also at the end of `run`): per run the final and best of each
metric of metrics.jsonl (training loss, validation loss and accuracy, ...) plus tokens/s
and MFU from summary.json, in DIR/results.csv and DIR/results.md (sorted by final
validation loss), and matplotlib plots: DIR/plots/loss_curves.png (every run's training
and validation loss on one figure) and DIR/plots/vs_<param>.png (each metric against
each swept parameter).
"""

from __future__ import annotations

import argparse
import ast
import csv
import itertools
import json
import math
import os
import random
import re
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN = "sweep.json"
DONE = ".done"


# ---------------------------------------------------------------------------------------
# The plan.

def parse_value(text: str):
  """A Python literal, or the text itself as a string (`rope` -> 'rope')."""
  text = text.strip()
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def _split_top(text: str) -> list[str]:
  """Splits on commas outside brackets and quotes."""
  parts, depth, quote, cur = [], 0, None, ""
  for ch in text:
    if quote:
      quote = None if ch == quote else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      parts.append(cur)
      cur = ""
      continue
    cur += ch
  if cur.strip():
    parts.append(cur)
  return parts


def parse_grid(spec: str) -> tuple[str, list]:
  """`NAME=[v1,v2]` -> (NAME, [v1, v2])."""
  name, sep, values = spec.partition("=")
  values = values.strip()
  if not sep or not name.strip() or not (values.startswith("[") and values.endswith("]")):
    raise SystemExit(f"sweep: --grid {spec!r}: expected NAME=[v1,v2,...]")
  vals = [parse_value(v) for v in _split_top(values[1:-1])]
  if not vals:
    raise SystemExit(f"sweep: --grid {spec!r}: no values")
  return name.strip(), vals


RANGE_KINDS = ("uniform", "loguniform", "int", "choice")


def parse_range(spec: str) -> tuple[str, str, list]:
  """`NAME=loguniform(1e-4,1e-2)` -> (NAME, kind, args)."""
  name, sep, body = spec.partition("=")
  m = re.fullmatch(r"\s*(\w+)\((.*)\)\s*", body)
  if not sep or not m or m.group(1) not in RANGE_KINDS:
    raise SystemExit(f"sweep: --range {spec!r}: expected NAME=KIND(a,b), KIND one of {RANGE_KINDS}")
  kind, args = m.group(1), [parse_value(a) for a in _split_top(m.group(2))]
  if kind != "choice" and (len(args) != 2 or not all(isinstance(a, (int, float)) for a in args)):
    raise SystemExit(f"sweep: --range {spec!r}: {kind} takes two numbers")
  if kind == "loguniform" and min(args) <= 0:
    raise SystemExit(f"sweep: --range {spec!r}: loguniform needs positive bounds")
  return name.strip(), kind, args


def draw(kind: str, args: list, rng: random.Random):
  if kind == "uniform":
    return rng.uniform(*args)
  if kind == "loguniform":
    return math.exp(rng.uniform(math.log(args[0]), math.log(args[1])))
  if kind == "int":
    return rng.randint(int(args[0]), int(args[1]))
  return rng.choice(args)


def gin_value(v) -> str:
  if isinstance(v, float):
    return f"{v:.6g}" if "e" in f"{v:.6g}" or "." in f"{v:.6g}" else f"{v:.6g}.0"
  return repr(v)


def _short(name: str) -> str:
  return name.rsplit(".", 1)[-1]


def _fmt(v) -> str:
  return f"{v:.3g}" if isinstance(v, float) else str(v)


def run_name(index: int, params: dict) -> str:
  body = ",".join(f"{_short(k)}={_fmt(v)}" for k, v in params.items())
  body = re.sub(r"[^A-Za-z0-9_.,=+-]", "", body)[:80]
  return f"{index:03d}_{body}" if body else f"{index:03d}"


def expand(grid: list[tuple[str, list]], ranges: list[tuple[str, str, list]] = (),
           samples: int = 0, seed: int = 0) -> list[dict]:
  """The runs' parameters: the grid's product, each crossed with `samples` random draws."""
  names = [n for n, _ in grid]
  combos = [dict(zip(names, values)) for values in itertools.product(*[v for _, v in grid])]
  if not ranges or samples <= 0:
    return combos
  rng = random.Random(seed)
  draws = [{name: draw(kind, args, rng) for name, kind, args in ranges} for _ in range(samples)]
  return [{**c, **d} for c in combos for d in draws]


def make_plan(recipe: list[str], bindings: list[str], grid, ranges, samples: int,
              seed: int) -> dict:
  runs = []
  for i, params in enumerate(expand(grid, ranges, samples, seed)):
    runs.append({"name": run_name(i, params), "params": params,
                 "bindings": [f"{k}={gin_value(v)}" for k, v in params.items()]})
  swept = [n for n, _ in grid] + [n for n, _, _ in ranges]
  return {"recipe": list(recipe), "bindings": list(bindings), "swept": swept, "runs": runs,
          "grid": {n: v for n, v in grid}, "ranges": {n: [k, a] for n, k, a in ranges},
          "samples": samples, "seed": seed}


def write_plan(sweep_dir: str, plan: dict) -> dict:
  """Writes DIR/sweep.json; an existing plan must be the same (else use another DIR)."""
  os.makedirs(sweep_dir, exist_ok=True)
  path = os.path.join(sweep_dir, PLAN)
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if _canon(old) != _canon(plan):
      raise SystemExit(f"sweep: {path} holds a different sweep (recipe, bindings or runs); "
                       f"use another --dir, or `run --dir {sweep_dir}` alone to resume it")
    return old
  with open(path, "w") as f:
    json.dump(plan, f, indent=1)
  return plan


def _canon(plan: dict) -> str:
  return json.dumps({k: plan.get(k) for k in ("recipe", "bindings", "runs")}, sort_keys=True)


def load_plan(sweep_dir: str) -> dict:
  path = os.path.join(sweep_dir, PLAN)
  if not os.path.exists(path):
    raise SystemExit(f"sweep: {path} does not exist: start the sweep with --recipe and --grid")
  with open(path) as f:
    return json.load(f)


def workdir(sweep_dir: str, run: dict) -> str:
  return os.path.join(sweep_dir, "runs", run["name"])


def is_finished(sweep_dir: str, run: dict) -> bool:
  wd = workdir(sweep_dir, run)
  return os.path.exists(os.path.join(wd, DONE)) and os.path.exists(os.path.join(wd, "summary.json"))


def train_command(plan: dict, run: dict, wd: str, python: str = sys.executable) -> list[str]:
  cmd = [python, "-m", "bigmodel", "train", f"--workdir={wd}"]
  cmd += [f"--gin_file={f}" for f in plan["recipe"]]
  cmd += [f"--gin.{b}" for b in list(plan["bindings"]) + list(run["bindings"])]
  return cmd


def _env() -> dict:
  env = dict(os.environ)
  shared = os.path.join(os.path.dirname(ROOT), "shared", "data")
  if not env.get("BIGMODEL_DATA_DIR") and os.path.isdir(shared):
    env["BIGMODEL_DATA_DIR"] = shared
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return env


def run_one(sweep_dir: str, plan: dict, run: dict, runner=None) -> int:
  """Trains one run (resuming its workdir if it has checkpoints); marks it done on success."""
  wd = os.path.abspath(workdir(sweep_dir, run))
  if is_finished(sweep_dir, run):
    return 0
  os.makedirs(wd, exist_ok=True)
  cmd = train_command(plan, run, wd)
  if runner is not None:
    rc = runner(cmd, wd)
  else:
    with open(os.path.join(wd, "train.log"), "a") as log:
      log.write(f"$ {shlex.join(cmd)}\n")
      log.flush()
      rc = subprocess.call(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
  if rc == 0 and os.path.exists(os.path.join(wd, "summary.json")):
    with open(os.path.join(wd, DONE), "w") as f:
      f.write(time.strftime("%Y-%m-%dT%H:%M:%S\n"))
  return rc


def run_all(sweep_dir: str, plan: dict, runner=None, log=print) -> dict:
  """Local runs, one at a time. Returns {name: 'skipped' | 'done' | 'failed (rc N)'}."""
  status = {}
  for i, run in enumerate(plan["runs"]):
    if is_finished(sweep_dir, run):
      status[run["name"]] = "skipped"
      log(f"[{i + 1}/{len(plan['runs'])}] {run['name']}: finished before, skipped")
      continue
    resumed = os.path.isdir(os.path.join(workdir(sweep_dir, run), "checkpoints"))
    log(f"[{i + 1}/{len(plan['runs'])}] {run['name']}: "
        f"{'resuming from its checkpoints' if resumed else 'training'} ...")
    t = time.time()
    rc = run_one(sweep_dir, plan, run, runner)
    status[run["name"]] = "done" if rc == 0 else f"failed (rc {rc})"
    log(f"    {status[run['name']]} in {time.time() - t:.0f}s "
        f"(log: {os.path.join(workdir(sweep_dir, run), 'train.log')})")
  return status


# ---------------------------------------------------------------------------------------
# Cluster plans.

def emit_slurm(sweep_dir: str, plan: dict, parallel: int = 0, gpus: int = 1) -> str:
  n = len(plan["runs"])
  array = f"0-{n - 1}" + (f"%{parallel}" if parallel else "")
  path = os.path.join(sweep_dir, "slurm_array.sbatch")
  text = f"""#!/usr/bin/env bash
# A SLURM job array: one array task per run of {os.path.join(sweep_dir, PLAN)}.
# Each task is `launch/sweep.py run-one`: a finished run is skipped, an interrupted
# (preempted, requeued) run resumes from its checkpoints. Aggregate afterwards with
#   python launch/sweep.py aggregate --dir {sweep_dir}
#
#   sbatch {path}
#
#SBATCH --job-name=sweep
#SBATCH --array={array}
#SBATCH --ntasks=1
#SBATCH --gpus-per-task={gpus}
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --output={os.path.abspath(sweep_dir)}/slurm-%A_%a.out
set -euo pipefail
cd {shlex.quote(ROOT)}
exec .venv/bin/python launch/sweep.py run-one --dir {shlex.quote(os.path.abspath(sweep_dir))} \\
  --index "$SLURM_ARRAY_TASK_ID"
"""
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, 0o755)
  return path


def emit_tpu(sweep_dir: str, plan: dict) -> str:
  """One launch/tpu_pod.sh line per run (TPU and ZONE from the environment; the sweep
  directory should be a gs:// path or on a filesystem every worker sees)."""
  path = os.path.join(sweep_dir, "tpu_commands.sh")
  lines = ["#!/usr/bin/env bash",
           f"# One line per run of {os.path.join(sweep_dir, PLAN)}; run them one after another, or",
           "# hand lines to separate TPU slices. Set TPU and ZONE first. Re-running a line resumes.",
           "set -euo pipefail"]
  for run in plan["runs"]:
    args = [f"--gin.{b}" for b in list(plan["bindings"]) + list(run["bindings"])]
    lines.append(f"WORKDIR={shlex.quote(workdir(sweep_dir, run))} launch/tpu_pod.sh "
                 + " ".join(shlex.quote(x) for x in plan["recipe"][:1] + args))
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  os.chmod(path, 0o755)
  return path


# ---------------------------------------------------------------------------------------
# Results.

def read_metrics(wd: str) -> tuple[list[dict], list[dict]]:
  """(training records, validation records) of a workdir's metrics.jsonl; a resumed run
  rewrites later steps, so the last record of a step wins."""
  train, evals = {}, {}
  path = os.path.join(wd, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        line = line.strip()
        if not line:
          continue
        try:
          rec = json.loads(line)
        except json.JSONDecodeError:
          continue          # a line cut by a kill
        (evals if rec.get("split") else train)[rec["step"]] = rec
  return [train[k] for k in sorted(train)], [evals[k] for k in sorted(evals)]


LOWER_IS_BETTER = ("loss", "perplexity")
SKIP_METRICS = ("step", "split", "learning_rate", "step_time", "param_norm", "grad_norm",
                "perplexity")
METRIC_ORDER = ("final_validation_loss", "best_validation_loss", "final_train_loss",
                "best_train_loss", "final_validation_accuracy", "best_validation_accuracy")


def summarize_run(sweep_dir: str, run: dict) -> dict:
  wd = workdir(sweep_dir, run)
  train, evals = read_metrics(wd)
  row = {"run": run["name"], **{k: v for k, v in run["params"].items()}}
  row["status"] = ("finished" if is_finished(sweep_dir, run) else
                   "partial" if train else "not started")
  row["step"] = train[-1]["step"] if train else 0
  for prefix, recs in (("train", train), ("validation", evals)):
    keys = sorted({k for r in recs for k, v in r.items()
                   if k not in SKIP_METRICS and isinstance(v, (int, float))})
    for k in keys:
      vals = [(r["step"], r[k]) for r in recs if isinstance(r.get(k), (int, float))]
      if not vals:
        continue
      row[f"final_{prefix}_{k}"] = vals[-1][1]
      lower = any(s in k for s in LOWER_IS_BETTER)
      pick = min if lower else max
      if k not in ("tokens_per_sec", "mfu"):
        row[f"best_{prefix}_{k}"] = pick(v for _, v in vals)
  summary_path = os.path.join(wd, "summary.json")
  if os.path.exists(summary_path):
    with open(summary_path) as f:
      s = json.load(f)
    for k in ("tokens_per_sec", "mfu", "wall_time_s"):
      if s.get(k) is not None:
        row[k] = s[k]
  for k in ("final_train_tokens_per_sec", "final_train_mfu"):
    row.pop(k, None)
  return row


def aggregate(sweep_dir: str, plan: dict | None = None, plots: bool = True) -> tuple[str, str, list]:
  """Writes results.csv and results.md (and plots); returns (csv path, markdown, rows)."""
  plan = plan or load_plan(sweep_dir)
  rows = [summarize_run(sweep_dir, run) for run in plan["runs"]]
  key = "final_validation_loss"
  rows.sort(key=lambda r: (r.get(key) is None, r.get(key, 0.0)))
  params = list(plan["swept"])
  metric_cols = sorted({k for r in rows for k in r if k.startswith(("final_", "best_"))},
                       key=lambda k: (METRIC_ORDER.index(k) if k in METRIC_ORDER
                                      else len(METRIC_ORDER), k))
  cols = ["run"] + params + metric_cols + [c for c in ("tokens_per_sec", "mfu", "wall_time_s",
                                                       "step", "status") if any(c in r for r in rows)]
  csv_path = os.path.join(sweep_dir, "results.csv")
  with open(csv_path, "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
      w.writerow(r)
  md = markdown_table(rows, ["run"] + params + [c for c in METRIC_ORDER if c in metric_cols] +
                      [c for c in ("tokens_per_sec", "step", "status") if c in cols], params)
  with open(os.path.join(sweep_dir, "results.md"), "w") as f:
    f.write(md + "\n")
  if plots:
    plot(sweep_dir, plan, rows)
  return csv_path, md, rows


def markdown_table(rows: list[dict], cols: list[str], params: list[str]) -> str:
  def cell(r, c):
    v = r.get(c)
    if v is None:
      return "-"
    if c == "tokens_per_sec":
      return f"{v:,.0f}"
    if isinstance(v, float):
      return f"{v:.4f}" if c not in params else _fmt(v)
    return str(v)
  head = [_short(c) if c in params else c for c in cols]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(cols)]
  for r in rows:
    lines.append("| " + " | ".join(cell(r, c) for c in cols) + " |")
  return "\n".join(lines)


def plot(sweep_dir: str, plan: dict, rows: list[dict]) -> list[str]:
  """loss_curves.png and one vs_<param>.png per swept parameter; returns their paths."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  out = os.path.join(sweep_dir, "plots")
  os.makedirs(out, exist_ok=True)
  paths = []
  fig, ax = plt.subplots(figsize=(9, 5.5))
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
  for i, run in enumerate(plan["runs"]):
    train, evals = read_metrics(workdir(sweep_dir, run))
    label = ", ".join(f"{_short(k)}={_fmt(v)}" for k, v in run["params"].items()) or run["name"]
    c = colors[i % len(colors)]
    if train:
      ax.plot([r["step"] for r in train], [r["loss"] for r in train], color=c, alpha=0.55,
              lw=1, label=f"{label} (train)")
    if evals:
      ax.plot([r["step"] for r in evals], [r["loss"] for r in evals], color=c, marker="o",
              lw=2, label=f"{label} (validation)")
  ax.set_xlabel("step")
  ax.set_ylabel("loss")
  ax.set_title(f"{os.path.basename(os.path.abspath(sweep_dir))}: loss curves")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  path = os.path.join(out, "loss_curves.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  paths.append(path)
  metrics = [k for k in ("final_validation_loss", "best_validation_loss", "final_train_loss",
                         "final_validation_accuracy", "tokens_per_sec")
             if any(r.get(k) is not None for r in rows)]
  for param in plan["swept"]:
    if not metrics:
      break
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4), squeeze=False)
    values = [r.get(param) for r in rows]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    cats = sorted({str(v) for v in values})
    for ax, metric in zip(axes[0], metrics):
      pts = [(r.get(param), r[metric]) for r in rows if r.get(metric) is not None]
      if numeric:
        xs = [p[0] for p in pts]
        ax.scatter(xs, [p[1] for p in pts])
        if xs and min(xs) > 0 and max(xs) / min(xs) > 20:
          ax.set_xscale("log")
      else:
        ax.scatter([cats.index(str(p[0])) for p in pts], [p[1] for p in pts])
        ax.set_xticks(range(len(cats)), cats, rotation=20)
        ax.set_xlim(-0.5, len(cats) - 0.5)
      ax.set_xlabel(_short(param))
      ax.set_title(metric, fontsize=9)
      ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out, f"vs_{_short(param)}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths.append(path)
  return paths


# ---------------------------------------------------------------------------------------
# Command line.

def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="launch/sweep.py", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)

  def plan_args(sp):
    sp.add_argument("--dir", required=True, help="the sweep directory")
    sp.add_argument("--recipe", action="append", default=[], help="base recipe gin file(s)")
    sp.add_argument("--grid", action="append", default=[], help='"NAME=[v1,v2]" (repeatable)')
    sp.add_argument("--range", action="append", default=[],
                    help='"NAME=loguniform(a,b)" | uniform(a,b) | int(a,b) | choice(v1,v2,...)')
    sp.add_argument("--samples", type=int, default=0, help="random draws of the ranges")
    sp.add_argument("--seed", type=int, default=0)

  r = sub.add_parser("run", help="plan (or resume) and train locally, one run at a time")
  plan_args(r)
  r.add_argument("--no_plots", action="store_true")
  e = sub.add_parser("emit", help="write a SLURM job array or a TPU command list")
  plan_args(e)
  e.add_argument("--target", choices=("slurm", "tpu"), required=True)
  e.add_argument("--parallel", type=int, default=0, help="SLURM: at most this many at once")
  e.add_argument("--gpus", type=int, default=1, help="SLURM: GPUs per run")
  o = sub.add_parser("run-one", help="train one run of a planned sweep (a SLURM array task)")
  o.add_argument("--dir", required=True)
  o.add_argument("--index", type=int, required=True)
  a = sub.add_parser("aggregate", help="results.csv, results.md and plots of a sweep")
  a.add_argument("--dir", required=True)
  a.add_argument("--no_plots", action="store_true")
  return p


def _plan_from_args(args, bindings) -> dict:
  if not args.recipe:
    if args.grid or args.range or bindings:
      raise SystemExit("sweep: --recipe is required to start a sweep")
    return load_plan(args.dir)
  for f in args.recipe:
    if not os.path.exists(f) and not os.path.exists(os.path.join(ROOT, f)):
      raise SystemExit(f"sweep: recipe {f!r} does not exist")
  # Recipes are stored relative to the repository root (runs start there), else absolute.
  args.recipe = [_root_relative(f) for f in args.recipe]
  grid = [parse_grid(g) for g in args.grid]
  ranges = [parse_range(x) for x in args.range]
  if ranges and args.samples <= 0:
    raise SystemExit("sweep: --range needs --samples N")
  if not grid and not (ranges and args.samples):
    raise SystemExit("sweep: give --grid NAME=[...] and/or --range ... --samples N")
  plan = make_plan(args.recipe, bindings, grid, ranges, args.samples, args.seed)
  return write_plan(args.dir, plan)


def _root_relative(path: str) -> str:
  if not os.path.exists(path):
    return path                   # already relative to ROOT (checked above)
  full = os.path.abspath(path)
  rel = os.path.relpath(full, ROOT)
  return full if rel.startswith("..") else rel


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  bindings = [a[len("--gin."):] for a in argv if a.startswith("--gin.")]
  args = _parser().parse_args([a for a in argv if not a.startswith("--gin.")])
  if args.command == "run":
    plan = _plan_from_args(args, bindings)
    print(f"sweep {args.dir}: {len(plan['runs'])} runs of {' + '.join(plan['recipe'])}", flush=True)
    status = run_all(args.dir, plan, log=lambda s: print(s, flush=True))
    csv_path, md, _ = aggregate(args.dir, plan, plots=not args.no_plots)
    print("\n" + md + f"\n\nwrote {csv_path}, {os.path.join(args.dir, 'results.md')}"
          + ("" if args.no_plots else f" and {os.path.join(args.dir, 'plots')}/"))
    return 0 if all(not s.startswith("failed") for s in status.values()) else 1
  if args.command == "emit":
    plan = _plan_from_args(args, bindings)
    path = (emit_slurm(args.dir, plan, args.parallel, args.gpus) if args.target == "slurm"
            else emit_tpu(args.dir, plan))
    print(f"wrote {path} ({len(plan['runs'])} runs)")
    return 0
  if args.command == "run-one":
    plan = load_plan(args.dir)
    if not 0 <= args.index < len(plan["runs"]):
      raise SystemExit(f"sweep: --index {args.index}: the sweep has {len(plan['runs'])} runs")
    return run_one(args.dir, plan, plan["runs"][args.index])
  csv_path, md, _ = aggregate(args.dir, plots=not args.no_plots)
  print(md + f"\n\nwrote {csv_path}, {os.path.join(args.dir, 'results.md')}"
        + ("" if args.no_plots else f" and {os.path.join(args.dir, 'plots')}/"))
  return 0


if __name__ == "__main__":
  sys.exit(main())
