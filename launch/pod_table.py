"""The README's pod table: `bigmodel compile --topology` for each size preset on each slice.

    JAX_PLATFORMS=cpu python launch/pod_table.py --out pod_table.jsonl [--max_compiles 2]
        [--topologies v5p-128,v5e-16,v5p-512] [--only gpt2_124m,bert_base_128] [--mfu 0.5]

One process compiles every row in turn (train step only, pure FSDP over all chips, bf16
activations and f32 params and AdamW moments), appends each report to the JSONL file as it
finishes (a re-run skips the rows already there), and prints the markdown table. The largest
batch: with --max_compiles N, `--find_max_batch`'s search (every figure a batch that compiled
and fit; "+" marks a lower bound); always, the straight-line estimate from the row's own
compile (bigmodel.pod.predicted_max_batch). Chip-hours for 10B tokens are an
ESTIMATE at the stated MFU (bigmodel.pod).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

BF16 = ["ModelConfig.dtype = 'bfloat16'", "ModelConfig.param_dtype = 'float32'"]
LM = ["experiments/runs/pretrain_lm.gin"]
LLAMA = ["experiments/runs/pretrain_llama.gin"]
BERT = ["experiments/runs/pretrain_bert.gin"]
BERT_MACROS = ["WARMUP_STEPS = 1000", "LEARNING_RATE = 1e-4"]

# name -> (gin files, bindings, seq_len, per-chip batch)
ROWS = {
    "gpt2_124m": (["experiments/sizes/gpt2_small.gin"] + LM, BF16, 1024, 8),
    "gpt2_medium": (["experiments/sizes/gpt2_medium.gin"] + LM, BF16, 1024, 4),
    "llama_1b": (["experiments/sizes/llama_1b.gin"] + LLAMA, [], 2048, 4),
    "llama2_7b": (["experiments/sizes/llama2_7b.gin"] + LLAMA, [], 4096, 4),
    "bert_base_128": (["experiments/sizes/bert_base.gin"] + BERT, BF16 + BERT_MACROS, 128, 32),
    "bert_base_512": (["experiments/sizes/bert_base.gin"] + BERT, BF16 + BERT_MACROS, 512, 8),
    "bert_large_128": (["experiments/sizes/bert_large.gin"] + BERT, BF16 + BERT_MACROS, 128, 32),
    "bert_large_512": (["experiments/sizes/bert_large.gin"] + BERT, BF16 + BERT_MACROS, 512, 8),
}
ORDER = ["bert_base_128", "gpt2_124m", "bert_large_128", "gpt2_medium", "llama_1b", "llama2_7b",
         "bert_base_512", "bert_large_512"]


def run_row(name: str, topo: str, mfu: float, max_compiles: int) -> dict:
  from bigmodel import config, pod, topology
  from bigmodel.config import MeshConfig
  files, bindings, seq, per_chip = ROWS[name]
  chips = topology.parse(topo).chips
  exp = config.load(files, bindings + ["TRAIN_STEPS = 10000", f"SEQ_LEN = {seq}",
                                       f"BATCH_SIZE = {per_chip * chips}"])
  t = time.perf_counter()
  r = pod.report(exp, topo, MeshConfig(data=1, fsdp=-1, tensor=1), skip_eval=True,
                 max_batch=max_compiles > 0, max_compiles=max_compiles,
                 estimate=pod.Estimate(mfu=mfu, train_tokens=1e10))
  return {"row": name, "wall_s": time.perf_counter() - t, **pod.json_summary(r)}


def table(rows: list[dict]) -> str:
  from bigmodel import pod
  gib = lambda b: "-" if b is None else f"{b / 2**30:.1f}"
  out = ["| model | seq | slice (chips) | mesh | global batch | GiB/chip | fits | largest batch "
         "(compiled / estimated) | est. chip-hours / 10B tokens | compile s |", "|" + "---|" * 10]
  for r in rows:
    mesh, compile_s = pod.table_cells(r)
    best = "-"
    if "max_batch_that_fits" in r:
      best = f"{r['max_batch_that_fits']}" + ("" if r["max_batch_exact"] else "+")
    best += f" / {r['predicted_max_batch']}" if "predicted_max_batch" in r else " / -"
    out.append(f"| {r['row']} ({r['params'] / 1e6:,.0f}M) | {r['seq_len']} | {r['topology']} ({r['chips']}) | "
               f"{mesh} | {r['batch']} | {gib(r['bytes_per_device'])} | {'yes' if r['fits'] else 'no'} | "
               f"{best} | {r['chip_hours']:,.0f} | {compile_s} |")
  return "\n".join(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="pod_table.jsonl")
  p.add_argument("--topologies", default="v5p-128,v5e-16,v5p-512")
  p.add_argument("--only", default="", help="comma-separated row names (default: all)")
  p.add_argument("--mfu", type=float, default=0.5)
  p.add_argument("--max_compiles", type=int, default=0, help="compiles of each row's batch search "
                 "(0: only the straight-line estimate from the row's own compile)")
  args = p.parse_args(argv)
  names = [n for n in ORDER if not args.only or n in args.only.split(",")]
  done = []
  if os.path.exists(args.out):
    with open(args.out) as f:
      done = [json.loads(line) for line in f if line.strip()]
  have = {(r["row"], r["topology"]) for r in done}
  for topo in args.topologies.split(","):
    for name in names:
      if (name, topo) in have:
        continue
      r = run_row(name, topo, args.mfu, args.max_compiles)
      done.append(r)
      with open(args.out, "a") as f:
        f.write(json.dumps(r) + "\n")
      print(f"{name} on {topo}: {r['wall_s']:.0f}s", file=sys.stderr, flush=True)
  order = {n: i for i, n in enumerate(ROWS)}
  done.sort(key=lambda r: (order.get(r["row"], 99), r["chips"]))
  print(table([r for r in done if r["row"] in names]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
