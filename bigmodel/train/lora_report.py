"""LoRA against full fine-tuning of the same model, in one process: trainable params,
optimizer-state memory, and the step-time ratio (the two compiled train steps timed in
alternating rounds, so that a busy host slows both alike).

    python -m bigmodel.train.lora_report --gin_file=experiments/finetune/bitext_sft_lora.gin \
        [--gin.NAME=VALUE ...] [--rounds 5 --steps 5]

The config is the LoRA run's (ModelConfig.lora_rank > 0); full fine-tuning is the same config
with lora_rank 0. Batches are random tokens of the run's shape (no data is read).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import jax
import jax.numpy as jnp


def _components(exp, mesh):
  from bigmodel.train import loop
  comp = loop.Components.build(exp, mesh)
  return comp, comp.init_state(jax.random.key(0)), comp.train_step()


def _batch(example: dict, vocab: int, seed: int) -> dict:
  rng = jax.random.key(seed)
  return {k: (jax.random.randint(rng, v.shape, 1, vocab, v.dtype) if k in ("inputs", "targets")
              else v) for k, v in example.items()}


def _nbytes(tree) -> int:
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def report(exp, rounds: int = 5, steps: int = 5) -> dict:
  from bigmodel import sharding
  from bigmodel.models import lora
  from bigmodel.train import state as state_lib
  if not exp.model.lora_rank:
    raise SystemExit("lora_report: the config has ModelConfig.lora_rank = 0; give the LoRA run's")
  mesh = sharding.make_mesh(exp.mesh)
  full_exp = dataclasses.replace(exp, model=dataclasses.replace(exp.model, lora_rank=0))
  runs = {"lora": _components(exp, mesh), "full": _components(full_exp, mesh)}
  out = {}
  for name, (comp, state, step) in runs.items():
    params = comp.abstract.params
    trained = lora.trainable(params) if name == "lora" else params
    out[name] = {"params": state_lib.param_count(params),
                 "trainable_params": lora.count(trained),
                 "opt_state_bytes": _nbytes(comp.abstract.opt_state)}
  batch = _batch(runs["lora"][0].example, exp.model.vocab_size, 0)
  states = {name: r[1] for name, r in runs.items()}
  times = {name: 0.0 for name in runs}
  for r in range(rounds + 1):                 # round 0 compiles and warms up: not counted
    for name, (_, _, step) in runs.items():
      t = time.perf_counter()
      for _ in range(steps):
        states[name], metrics = step(states[name], batch)
      jax.block_until_ready(metrics)
      if r:
        times[name] += time.perf_counter() - t
  for name in runs:
    out[name]["step_time_s"] = times[name] / (rounds * steps)
  out["step_time_ratio_lora_over_full"] = times["lora"] / times["full"]
  out["opt_state_ratio_lora_over_full"] = out["lora"]["opt_state_bytes"] / out["full"]["opt_state_bytes"]
  return out


def main(argv=None) -> int:
  from bigmodel import cli, config
  argv, bindings = cli._split_gin_bindings(list(argv) if argv is not None else __import__("sys").argv[1:])
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--gin_file", action="append", default=[])
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps", type=int, default=5, help="steps of each run per round")
  args = p.parse_args(argv)
  exp = config.load(args.gin_file, bindings)
  print(json.dumps(report(exp, args.rounds, args.steps), indent=1))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
