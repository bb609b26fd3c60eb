"""`bigmodel bench --loop`: the training loop's tokens/s beside its own step's, in one run.

    bigmodel bench --loop [--recipe experiments/gpt_shakespeare_char.gin] [--steps 300]
                          [--rounds 3] [--out out/bench/loop.json] [--gin.NAME=VALUE ...]

Each round times, one after the other so that all see the same machine load:
  step        the train step `bigmodel train` compiles (same Components, same bad-step guard),
              on one real batch already on device, `--steps` steps dispatched back to back with
              one wait at the end: what the device can do with no loop around it
  loop        `train()` for `--steps` steps into a fresh workdir (logging every
              TrainConfig.log_every steps, a checkpoint and an eval at the end), its tokens/s
              from the run's own clock (the summary: compile and eval excluded)
  loop_sync   the same loop without batches prefetched to device (`train(prefetch=0)`)
  bench_step  the step `make bench` times for this recipe (its preset's bindings), if it has one
  loop_scanned  the loop with ModelConfig.scan_layers = True, when the recipe unrolls its layers
The result: each figure's median over rounds (tokens/s, and process CPU ms a step: the work,
which a busy machine disturbs less than the wall clock) and the median of the per-round ratios
of each loop to each step (1.0: the loop costs nothing; the goal is >= 0.95).
The default recipe is the demo (nanoGPT's shape: 4 layers, d 128, seq 64, batch 12), on the
devices `bigmodel train` would use (no fake devices).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import resource
import statistics
import sys
import tempfile
import time

from bigmodel.train import hooks

DEMO = "experiments/gpt_shakespeare_char.gin"


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="bigmodel bench --loop", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--recipe", default=DEMO)
  p.add_argument("--steps", type=int, default=300, help="timed steps a figure (after one warm-up)")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--out", default="out/bench/loop.json")
  return p


def _cpu_s() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


class _CpuClock(hooks.Hook):
  """Process CPU seconds from the end of the first (compiling) step to the last step's fetched
  metrics: the loop's whole cost on the host, the device threads of XLA:CPU included."""

  def due(self, step, last):
    return step == last or not hasattr(self, "t0")

  def __call__(self, run, step):
    if not hasattr(self, "t0"):
      self.t0, self.step0 = _cpu_s(), step
    else:
      self.ms_per_step = (_cpu_s() - self.t0) / (step - self.step0) * 1e3


def isolated_step(exp, steps: int) -> tuple[float, float]:
  """(tokens/s, CPU ms a step) of the loop's own compiled step on one real batch, `steps` steps
  back to back."""
  import jax
  from bigmodel import sharding
  from bigmodel.data import lm as lm_data
  from bigmodel.train import loop
  comp = loop.Components.build(exp, sharding.make_mesh(exp.mesh))
  data = comp.build_data()
  batch = next(lm_data.global_iterator(data.train_batches(exp.train.batch_size),
                                       sharding.batch_sharding(comp.mesh)))
  step = comp.train_step()
  state = comp.init_state(jax.random.key(0))
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  t, c = time.perf_counter(), _cpu_s()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  wall, cpu = time.perf_counter() - t, _cpu_s() - c
  return steps * loop.batch_tokens(batch) / wall, cpu / steps * 1e3


def loop_run(exp, steps: int, prefetch: int) -> tuple[float, float]:
  """(tokens/s, CPU ms a step) of `train()` over 1 + `steps` steps (its summary's tokens/s), in
  a temporary workdir."""
  from bigmodel.train import loop
  tc = dataclasses.replace(exp.train, train_steps=steps + 1, eval_every=0, checkpoint_every=0,
                           sample_len=0, async_checkpoints=False)
  exp = dataclasses.replace(exp, train=tc)
  clock = _CpuClock()
  with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stdout(io.StringIO()):
    summary = loop.train(exp, workdir, hooks=[clock], prefetch=prefetch)
  return summary["tokens_per_sec"], clock.ms_per_step


def variants(exp, bench_exp) -> dict:
  """name -> () -> (tokens/s, CPU ms a step)."""
  out = {"step": lambda s: isolated_step(exp, s),
         "loop": lambda s: loop_run(exp, s, prefetch=2),
         "loop_sync": lambda s: loop_run(exp, s, prefetch=0)}
  if bench_exp is not None:
    out["bench_step"] = lambda s: isolated_step(bench_exp, s)
  if not exp.model.scan_layers:
    scanned = dataclasses.replace(exp, model=dataclasses.replace(exp.model, scan_layers=True))
    out["loop_scanned"] = lambda s: loop_run(scanned, s, prefetch=2)
  return out


def measure(exp, steps: int, rounds: int, bench_exp=None, log=print) -> dict:
  runs = variants(exp, bench_exp)
  tps: dict[str, list] = {k: [] for k in runs}
  cpu: dict[str, list] = {k: [] for k in runs}
  for r in range(rounds):
    for name, fn in runs.items():
      t, c = fn(steps)
      tps[name].append(t)
      cpu[name].append(c)
    log(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:,.0f} ({cpu[k][-1]:.1f} CPU ms/step)"
                                                for k, v in tps.items()) + " tokens/s")
  result = {f"{k}_tokens_per_sec": statistics.median(v) for k, v in tps.items()}
  result.update({f"{k}_cpu_ms_per_step": statistics.median(v) for k, v in cpu.items()})
  for base in ("step", "bench_step"):
    for k in (n for n in runs if n.startswith("loop") and base in runs):
      ratios = [a / b for a, b in zip(tps[k], tps[base])]
      result[f"{k}_vs_{base}"] = statistics.median(ratios)
      result[f"{k}_vs_{base}_rounds"] = ratios
      work = [b / a for a, b in zip(cpu[k], cpu[base])]     # step's CPU a step / loop's
      result[f"{k}_vs_{base}_cpu"] = statistics.median(work)
      result[f"{k}_vs_{base}_cpu_rounds"] = work
  result["rounds"] = {"tokens_per_sec": tps, "cpu_ms_per_step": cpu}
  return result


def bench_config(recipe: str, bindings: list[str]):
  """The experiment `make bench` times for this recipe (its preset's bindings), or None."""
  from bigmodel import bench, config
  for files, extra in bench.PRESETS.values():
    if files == [recipe]:
      return config.load(files, bindings + extra)
  return None


def main(argv: list[str]) -> int:
  bindings = [a[len("--gin."):].replace("=", " = ", 1) for a in argv if a.startswith("--gin.")]
  args = _parser().parse_args([a for a in argv if not a.startswith("--gin.") and a != "--loop"])
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from bigmodel import config
  bindings += ["TrainConfig.peak_flops = 1e12"]   # no start-up matmul timing: MFU is not shown
  try:
    bench_exp = bench_config(args.recipe, bindings)
    exp = config.load([args.recipe], bindings)
  except config.ConfigError as e:
    print(f"bigmodel bench: error: {e}", file=sys.stderr)
    return 2
  import jax
  shape = (f"{exp.model.num_layers} layers, d {exp.model.d_model}, seq {exp.data.seq_len}, "
           f"batch {exp.train.batch_size}")
  print(f"loop vs step: {args.recipe} ({shape}); {jax.device_count()} "
        f"{jax.devices()[0].platform} device(s); {args.rounds} rounds of {args.steps} steps",
        flush=True)
  result = {"recipe": args.recipe, "shape": shape, "steps": args.steps,
            **measure(exp, args.steps, args.rounds, bench_exp, log=lambda s: print(s, flush=True))}
  print("ratios (wall: tokens/s; cpu: the step's CPU time a step over the loop's):")
  for key in sorted(k for k in result if "_vs_" in k and not k.endswith("_rounds")):
    print(f"{key}: {result[key]:.3f} (rounds: "
          f"{', '.join(f'{r:.3f}' for r in result[key + '_rounds'])})")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  return 0
