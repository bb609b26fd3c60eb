"""Training throughput benchmark: tokens/s, step time, MFU and per-device memory.

    python -m bigmodel.bench [--preset demo --preset gpt2_small] [--steps 5] [--out out/bench/results.json]
    python -m bigmodel.bench --gin_file experiments/X.gin [--gin.NAME=VALUE ...]

Each point compiles the real train step (the same `Components` as `bigmodel train`)
on random tokens, runs warm-up steps, then reports the median of timed steps. MFU is
given in two labelled conventions against the machine's peak measured in the same run:
  mfu_palm    6N + 12*L*H*Q*T FLOPs per token (PaLM appendix B)
  mfu_causal  the same with half the attention term (MaxText's causal convention)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

PRESETS = {
    # nanoGPT's CPU Shakespeare configuration (the demo).
    "demo": (["experiments/gpt_shakespeare_char.gin"], []),
    # GPT-2 small: 12L/12H/768d, vocab 50,304, seq 256, batch 4.
    "gpt2_small": (["experiments/sizes/gpt2_small.gin", "experiments/runs/pretrain_lm.gin"],
                   ["TRAIN_STEPS = 100", "BATCH_SIZE = 4", "SEQ_LEN = 256"]),
}


def _random_batch(comp, seed: int = 0):
  import jax
  import numpy as np
  from bigmodel import sharding
  exp = comp.exp
  rng = np.random.default_rng(seed)
  b, s = exp.train.batch_size, exp.data.seq_len
  tokens = rng.integers(0, exp.model.vocab_size, (b, s + 1)).astype(np.int32)
  host = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy(),
          "segment_ids": np.ones((b, s), np.int32), "weights": np.ones((b, s), np.float32)}
  return jax.device_put(host, sharding.batch_sharding(comp.mesh))


def bench_point(name: str, exp, *, steps: int = 5, warmup: int = 2, peak: float) -> dict:
  """One benchmark record for an experiment config (causal-LM objective)."""
  import jax
  from bigmodel import sharding
  from bigmodel.train.loop import Components
  from bigmodel.train.state import param_count
  mesh = sharding.make_mesh(exp.mesh)
  comp = Components.build(exp, mesh)
  batch = _random_batch(comp)
  step_fn = comp.train_step()
  t = time.perf_counter()
  compiled = step_fn.lower(comp.abstract, batch).compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  memory = None
  if mem is not None:
    memory = int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
                 - mem.alias_size_in_bytes)
  state = comp.init_state(jax.random.key(0))
  for _ in range(warmup):
    state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - t)
  step_s = statistics.median(times)
  tokens = exp.train.batch_size * exp.data.seq_len
  tps = tokens / step_s
  m = exp.model
  return {
      "name": name, "framework": "bigmodel", "objective": exp.train.objective,
      "config": {"layers": m.num_layers, "heads": m.num_heads, "d_model": m.d_model,
                 "vocab": m.vocab_size, "dtype": m.dtype, "remat": m.remat,
                 "scan_layers": m.scan_layers},
      "mesh": dict(mesh.shape), "batch": exp.train.batch_size, "seq": exp.data.seq_len,
      "params": param_count(comp.abstract.params),
      "tokens_per_sec": tps, "tokens_per_sec_per_device": tps / mesh.size,
      "step_ms": step_s * 1e3, "step_ms_all": [x * 1e3 for x in times],
      "mfu_palm": tps * comp.flops_per_token(causal=False) / peak,
      "mfu_causal": tps * comp.flops_per_token(causal=True) / peak,
      "memory_bytes_per_device": memory, "compile_s": compile_s,
      "loss_after": float(metrics["loss"]),
  }


def format_table(records: list[dict], peak: float, peak_how: str) -> str:
  lines = [f"peak: {peak / 1e9:.1f} GFLOP/s, {peak_how}", "",
           "| name | framework | mesh | batch x seq | params | tokens/s | step ms | MFU (PaLM) | MFU (causal) | memory/device | compile s |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in records:
    mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1) or "1 device"
    mem = f"{r['memory_bytes_per_device'] / 2**20:.0f} MiB" if r.get("memory_bytes_per_device") else "-"
    lines.append(f"| {r['name']} | {r['framework']} | {mesh} | {r['batch']} x {r['seq']} | "
                 f"{r['params'] / 1e6:.1f}M | {r['tokens_per_sec']:,.0f} | {r['step_ms']:.1f} | "
                 f"{r['mfu_palm']:.1%} | {r['mfu_causal']:.1%} | {mem} | {r['compile_s']:.1f} |")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  bindings = [a[len("--gin."):] for a in argv if a.startswith("--gin.")]
  argv = [a for a in argv if not a.startswith("--gin.")]
  p = argparse.ArgumentParser(prog="python -m bigmodel.bench", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", action="append", choices=sorted(PRESETS),
                 help="benchmark points (default: demo and gpt2_small)")
  p.add_argument("--gin_file", action="append", default=[])
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--out", default="out/bench/results.json")
  args = p.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from bigmodel import config, flops
  from bigmodel.config import MeshConfig
  points = []
  if args.gin_file:
    points.append(("custom", args.gin_file, bindings))
  for name in args.preset or ([] if args.gin_file else ["demo", "gpt2_small"]):
    files, b = PRESETS[name]
    points.append((name, files, b + bindings))
  peak, peak_how = flops.machine_peak()
  print(f"measured peak: {peak / 1e9:.1f} GFLOP/s ({peak_how})", flush=True)
  records = []
  for name, files, b in points:
    exp = config.load(files, b)
    exp = dataclasses.replace(exp, mesh=MeshConfig(data=-1))
    rec = bench_point(name, exp, steps=args.steps, warmup=args.warmup, peak=peak)
    rec["peak_flops"] = peak
    records.append(rec)
    print(f"{name}: {rec['tokens_per_sec']:,.0f} tokens/s, {rec['step_ms']:.1f} ms/step, "
          f"MFU {rec['mfu_palm']:.1%} (PaLM)", flush=True)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump({"peak_flops": peak, "peak_source": peak_how, "records": records}, f, indent=1)
  print()
  print(format_table(records, peak, peak_how))
  print(f"\nwrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
