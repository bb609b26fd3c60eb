"""Speed of a float workdir against its `bigmodel quantize` copies, interleaved in one process.

    python -m bigmodel.quant_bench --workdir W --quantized W8,W8w [--rounds 5] [--batch 32]

A classifier (any encoder objective): the forward pass on `--batch` rows of the run's eval
file (DataConfig.val_files[0]) at its seq_len, or with `--full` a pass over every eval row in
batches of `--batch`; its row also counts the compiled forward's dots by element types
(`dots`: "s32<-s8,s8" is a real int8 matmul, "f32<-f32,f32" a float one). A decoder: greedy generation of `--new_tokens`
tokens for `--batch` copies of a prompt (prefill + KV-cache loop, bigmodel.infer.decode).
Each round times every variant once (after a compile and a warm-up call), so that a busy host
slows them alike; prints the median seconds per call and each one's speed-up over the float
model, the params' bytes, a classifier's accuracy on every eval row and a decoder's
agreement with the float model's greedy tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import time

import jax
import numpy as np


def _classifier_calls(workdirs, exp, batch, eval_rows=0, full=False, time_rows=0):
  from bigmodel import config
  from bigmodel.data import finetune as ft_data
  from bigmodel.data import readers
  from bigmodel.evaluation import tasks
  from bigmodel.train import loop
  calls, sizes = {}, {}
  table = None
  for w in workdirs:
    if w != workdirs[0]:    # its own config: a quantized copy, or another classifier (a student)
      exp_w = config.load([os.path.join(w, "config.gin")])
      if exp_w.data.seq_len != exp.data.seq_len:
        raise ValueError(f"{w} has seq_len {exp_w.data.seq_len}, {workdirs[0]} "
                         f"{exp.data.seq_len}: compare models on the same inputs")
    comp, params, tokenizer, _ = loop.restore_for_inference(w, exp if w == workdirs[0] else exp_w)
    if table is None:
      cfg = exp.task_data     # DataConfig with the task section's fields (text columns, labels)
      path = readers.resolve(cfg.val_files[0], cfg.data_dir)
      table = ft_data.load_eval(cfg, tokenizer, tasks.label_set(cfg), path)
    ids, seg, mask = (np.asarray(getattr(table, k)[:batch]) for k in
                      ("input_ids", "segment_ids", "input_mask"))
    fn = jax.jit(lambda p, ids, seg, mask, m=comp.model: m.apply({"params": p}, ids, seg, mask))
    if full:      # one call = the first time_rows eval rows in batches (the last one padded)
      calls[w] = lambda fn=fn, p=params: _accuracy(fn, p, table, batch, time_rows)
    else:
      calls[w] = lambda fn=fn, p=params: jax.block_until_ready(fn(p, ids, seg, mask))
    sizes[w] = {"param_bytes": _nbytes(params),
                "accuracy": _accuracy(fn, params, table, batch, eval_rows),
                "dots": dot_types(fn.lower(params, ids, seg, mask).compile().as_text())}
  return calls, sizes


def dot_types(hlo: str) -> dict[str, int]:
  """Counts of the compiled module's dot instructions by 'result<-lhs,rhs' element types, e.g.
  {'s32<-s8,s8': 36, 'f32<-f32,f32': 24}: whether an int8 matmul really runs in int8; and
  the count of library fusions by kind ('__ynn_fusion': XLA:CPU hands the dot to YNNPACK)."""
  shapes = dict(re.findall(r"%(\S+) = (\w+)\[", hlo))     # instruction -> element type
  out: dict[str, int] = {}
  for res, a, b in re.findall(r"= (\w+)\[[^=]*? dot\(%(\S+?), %(\S+?)\)", hlo):
    key = f"{res}<-{shapes.get(a, '?')},{shapes.get(b, '?')}"
    out[key] = out.get(key, 0) + 1
  for kind in re.findall(r'"kind":"(__\w+)"', hlo):    # library fusions (XLA:CPU: __ynn_fusion)
    out[kind] = out.get(kind, 0) + 1
  return out


def _accuracy(fn, params, table, batch, rows=0) -> float:
  """Accuracy over the first `rows` (0: every) row of the eval table (the last batch padded),
  with the same compiled forward as the timing."""
  n, correct = min(rows or len(table.labels), len(table.labels)), 0
  for i in range(0, n, batch):
    rows = np.arange(i, i + batch) % n
    logits = np.asarray(fn(params, table.input_ids[rows], table.segment_ids[rows],
                           table.input_mask[rows]))
    k = min(batch, n - i)
    correct += int((logits[:k].argmax(-1) == table.labels[i:i + k]).sum())
  return correct / n


def _decoder_calls(workdirs, exp, batch, new_tokens):
  from bigmodel.infer import decode, restore
  calls, sizes = {}, {}
  for w in workdirs:
    model, params, tokenizer, _ = restore.restore_decoder(w, exp)
    gen = decode.Generator(model, params)
    prompt = tokenizer.encode("ROMEO:")
    calls[w] = lambda gen=gen, prompt=prompt: gen([prompt] * batch, new_tokens, temperature=0.0)
    sizes[w] = {"param_bytes": _nbytes(params), "greedy": calls[w]()[0].tokens}
  return calls, sizes


def _nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="the float run")
  p.add_argument("--quantized", required=True, help="comma-separated `bigmodel quantize` outputs "
                 "(or other classifier workdirs with the same tokenizer and seq_len, e.g. a student)")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--new_tokens", type=int, default=64)
  p.add_argument("--eval_rows", type=int, default=0, help="classifier accuracy on the first N "
                 "eval rows (0: all)")
  p.add_argument("--full", action="store_true", help="classifier: time a pass over the eval "
                 "rows (--time_rows) in batches of --batch, not one batch")
  p.add_argument("--time_rows", type=int, default=0, help="with --full: time the first N eval "
                 "rows (0: all)")
  args = p.parse_args(argv)
  from bigmodel import config
  from bigmodel.infer import restore
  exp = config.load([os.path.join(args.workdir, "config.gin")])
  workdirs = [args.workdir] + [w for w in args.quantized.split(",") if w]
  if exp.train.objective in restore.DECODER_OBJECTIVES:
    calls, sizes = _decoder_calls(workdirs, exp, args.batch, args.new_tokens)
  else:
    calls, sizes = _classifier_calls(workdirs, exp, args.batch, args.eval_rows, args.full,
                                     args.time_rows)
  for call in calls.values():       # compile, then one warm-up call (--full: the accuracy
    if not args.full:               # pass compiled and warmed it up)
      call(), call()
    elif args.time_rows:
      call()
  times = {w: [] for w in workdirs}
  for _ in range(args.rounds):
    for w in workdirs:
      t0 = time.perf_counter()
      calls[w]()
      times[w].append(time.perf_counter() - t0)
  base = statistics.median(times[args.workdir])
  ref = sizes[args.workdir].get("greedy")
  for w in workdirs:
    med = statistics.median(times[w])
    row = {"workdir": w, "median_s": round(med, 4), "speedup": round(base / med, 3), **sizes[w],
           "times": [round(t, 4) for t in times[w]]}
    if ref is not None:     # the share of greedy tokens equal to the float model's
      got = row.pop("greedy")
      row["greedy_agreement"] = float(np.mean([a == b for a, b in zip(got, ref)])) if ref else 1.0
    print(json.dumps(row))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
