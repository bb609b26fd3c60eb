"""Prepared-data figures: prepare throughput, input pipeline vs the train step, host RSS vs corpus size.

    python launch/data_bench.py [--big_tokens 1e9] [--small_tokens 1e7] [--work /tmp/bigmodel-data-bench]

1. `bigmodel data prepare` throughput on real text: WikiText-2 (raw test split) copied into
   several files under the work dir, byte and SentencePiece tokens, 1 and 2 worker processes.
2. Generated corpora of `--small_tokens` and `--big_tokens` tokens (seq_len 1024, and a small
   one at seq_len 64), written with the prepare shard writer (`prepare.write_token_shards`).
3. Input pipeline tokens/s (this host's tf.data batches, as numpy) at the demo recipe's shape
   (batch 12 x 64) and GPT-2 small's (batch 8 x 1024), against the tokens/s the train step
   consumes at the same shape on this machine (the in-memory pipeline of the demo recipe too).
4. Peak and final resident memory (VmHWM, VmRSS) of a fresh process that reads 2,000 batches,
   and of a fresh `bigmodel train` run (tiny model, seq 1024, batch 8; glibc's default
   allocator, BIGMODEL_MALLOC=system), from the small and the big corpus.
The big corpus is deleted at the end unless --keep. Needs $BIGMODEL_DATA_DIR or ../shared/data.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def data_dir() -> str:
  return os.environ.get("BIGMODEL_DATA_DIR") or str(ROOT.parent / "shared" / "data")


def proc_memory() -> dict:
  out = {}
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(("VmHWM", "VmRSS")):
        out[line.split(":")[0]] = int(line.split()[1]) / 1024   # MiB
  return out


# ---------------------------------------------------------------------------------------
# 1. prepare throughput on real text.

def prepare_throughput(work: pathlib.Path, copies: int) -> list[dict]:
  from bigmodel import config
  from bigmodel.data import prepare, tokenizers
  raw = pathlib.Path(data_dir()) / "wikitext2_raw" / "wiki.test.raw"
  text_dir = work / "wikitext"
  text_dir.mkdir(parents=True, exist_ok=True)
  for i in range(copies):
    shutil.copyfile(raw, text_dir / f"part{i:02d}.raw")
  spm = tokenizers.train_sentencepiece([str(raw)], 8000, "unigram", str(work / "spm8k"))
  results = []
  for tok in ("byte", spm):
    for workers in (1, 2):
      cfg = config.load([], [
          "ModelConfig.vocab_size = 8000", "TrainConfig.train_steps = 1", "TrainConfig.batch_size = 8",
          f"DataConfig.files = ['{text_dir}/*.raw']", "DataConfig.documents = 'heading'",
          f"DataConfig.tokenizer = '{tok}'", "DataConfig.seq_len = 1024"]).data
      out = work / f"prep-{os.path.basename(tok)}-{workers}"
      shutil.rmtree(out, ignore_errors=True)
      s = prepare.prepare(cfg, str(out), workers=workers)
      results.append({"tokenizer": "byte" if tok == "byte" else "sentencepiece unigram 8k",
                      "workers": workers, "chunks": s["chunks"], "tokens": s["tokens"],
                      "text_mb": raw.stat().st_size * copies / 2**20,
                      "seconds": s["seconds"], "tokens_per_sec": s["tokens_per_sec"]})
      print(json.dumps(results[-1]), flush=True)
      shutil.rmtree(out)
  return results


# ---------------------------------------------------------------------------------------
# 2. generated corpora.

def write_generated(out: pathlib.Path, tokens: int, seq_len: int, shard_tokens: int = 2**25,
                    mean_doc: int = 600, seed: int = 0) -> dict:
  """A prepared dir of random byte-vocabulary tokens in documents of ~mean_doc tokens."""
  import numpy as np
  from bigmodel.data import prepare, tokenizers
  fmt = prepare.RowFormat(seq_len, "uint16")
  rng = np.random.default_rng(seed)

  def streams(total):
    left = total
    while left > 0:
      n = min(shard_tokens, left)
      starts = np.zeros(n, bool)
      starts[rng.integers(0, n, n // mean_doc)] = True
      starts[0] = True
      yield rng.integers(0, 257, n, dtype=np.uint16), starts
      left -= n

  t0 = time.perf_counter()
  index = {"format": prepare.FORMAT, "version": prepare.VERSION, "seq_len": seq_len,
           "window_stride": seq_len, "token_dtype": "uint16", "row_bytes": fmt.row_bytes,
           "vocab_size": 257, "eos_id": 256, "add_eos": True, "documents": "generated",
           "tokenizer": "byte", "splits": {
               "train": prepare.write_token_shards(str(out), "train", streams(tokens), fmt, seq_len),
               "val": prepare.write_token_shards(str(out), "val", streams(64 * (seq_len + 1)), fmt,
                                                 seq_len)}}
  tokenizers.ByteTokenizer().save(str(out))
  prepare.write_index(str(out), index)
  size = sum(f.stat().st_size for f in out.iterdir())
  info = {"dir": str(out), "tokens": tokens, "rows": index["splits"]["train"]["rows"],
          "shards": len(index["splits"]["train"]["shards"]), "disk_gb": size / 1e9,
          "write_seconds": time.perf_counter() - t0}
  print(json.dumps(info), flush=True)
  return info


# ---------------------------------------------------------------------------------------
# 3. pipeline vs step.

def data_cfg(prepared_dir: str, seq_len: int):
  from bigmodel import config
  return config.load([], ["ModelConfig.vocab_size = 257", "TrainConfig.train_steps = 1",
                          "TrainConfig.batch_size = 8", f"DataConfig.seq_len = {seq_len}",
                          f"DataConfig.prepared_dir = '{prepared_dir}'"]).data


def pipeline_tps(data, batch: int, seq_len: int, seconds: float = 4.0) -> float:
  it = data.train_batches(batch, 0).as_numpy_iterator()
  for _ in range(5):
    next(it)
  n, t0 = 0, time.perf_counter()
  while time.perf_counter() - t0 < seconds:
    next(it)
    n += 1
  return n * batch * seq_len / (time.perf_counter() - t0)


def step_tps(gin_files: list[str], bindings: list[str], seconds: float = 4.0, max_steps: int = 50) -> float:
  from bigmodel import bench, config
  exp = config.load(gin_files, bindings)
  runner = bench.BigmodelRunner(exp)
  runner.step()
  n, t0 = 0, time.perf_counter()
  while n < max_steps and (n < 2 or time.perf_counter() - t0 < seconds):
    runner.step()
    n += 1
  return n * exp.train.batch_size * exp.data.seq_len / (time.perf_counter() - t0)


def pipeline_vs_step(small64: str, small1024: str, big1024: str, gpt2_step: bool) -> dict:
  from bigmodel.data import lm
  demo = ["experiments/gpt_shakespeare_char.gin"]
  demo_b = [f"DATA_DIR = '{data_dir()}'"]
  from bigmodel import config
  in_memory = lm.LMData.build(config.load(demo, demo_b).data)
  out = {
      "demo_12x64_in_memory_pipeline": pipeline_tps(in_memory, 12, 64),
      "demo_12x64_prepared_pipeline": pipeline_tps(lm.LMData.build(data_cfg(small64, 64)), 12, 64),
      "gpt2_8x1024_prepared_pipeline_10M": pipeline_tps(lm.LMData.build(data_cfg(small1024, 1024)), 8, 1024),
      "gpt2_8x1024_prepared_pipeline_1B": pipeline_tps(lm.LMData.build(data_cfg(big1024, 1024)), 8, 1024),
      "demo_12x64_train_step": step_tps(demo, demo_b),
  }
  if gpt2_step:
    out["gpt2_small_1x1024_train_step"] = step_tps(
        ["experiments/sizes/gpt2_small.gin", "experiments/runs/pretrain_lm.gin"],
        ["TRAIN_STEPS = 10", "BATCH_SIZE = 1", "SEQ_LEN = 1024"], max_steps=2)
  for k, v in out.items():
    print(f"{k}: {v:,.0f} tokens/s", flush=True)
  return out


# ---------------------------------------------------------------------------------------
# 4. resident memory, each in a fresh process.

def child_pipeline(prepared_dir: str, batches: int) -> dict:
  from bigmodel.data import lm
  data = lm.LMData.build(data_cfg(prepared_dir, 1024))
  it = data.train_batches(8, 0).as_numpy_iterator()
  after = {}
  for i in range(batches):
    next(it)
    if i == 100:
      after = proc_memory()
  return {"after_100": after, "end": proc_memory(), "batches": batches}


def child_train(prepared_dir: str, workdir: str, steps: int) -> dict:
  from bigmodel import cli
  shutil.rmtree(workdir, ignore_errors=True)
  args = ["train", "--workdir", workdir] + [f"--gin.{b}" for b in [
      "ModelConfig.vocab_size=257", "ModelConfig.d_model=64", "ModelConfig.num_layers=2",
      "ModelConfig.num_heads=4", "ModelConfig.max_len=1024", "DataConfig.seq_len=1024",
      f"DataConfig.prepared_dir='{prepared_dir}'", "DataConfig.eval_batches=2",
      f"TrainConfig.train_steps={steps}", "TrainConfig.batch_size=8", "TrainConfig.log_every=10",
      "TrainConfig.peak_flops=1e11", "TrainConfig.objective='causal_lm'"]]
  rc = cli.main(args)
  shutil.rmtree(workdir, ignore_errors=True)
  return {"rc": rc, "end": proc_memory(), "steps": steps}


def run_child(*args, malloc: str = "") -> dict:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", JAX_PLATFORMS="cpu")
  if malloc:
    env["BIGMODEL_MALLOC"] = malloc
  proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                        env=env, cwd=ROOT)
  if proc.returncode:
    raise RuntimeError(f"child {args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def memory(small: str, big: str, work: pathlib.Path, steps: int) -> dict:
  out = {}
  for name, d in (("10M", small), ("1B", big)):
    out[f"pipeline_{name}"] = run_child("pipeline", d, "2000")
    # glibc's default allocator: bigmodel's (bigmodel.hostmem) keeps the heap's high-water mark,
    # which varies by about a GiB between identical runs with the order of XLA's and tf.data's
    # allocations, and would hide the data's share.
    out[f"train_{name}"] = run_child("train", d, str(work / f"run-{name}"), str(steps),
                                     malloc="system")
    print(f"{name}: pipeline {out[f'pipeline_{name}']}; train {out[f'train_{name}']}", flush=True)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--work", default="/tmp/bigmodel-data-bench")
  p.add_argument("--small_tokens", type=float, default=1e7)
  p.add_argument("--big_tokens", type=float, default=1e9)
  p.add_argument("--text_copies", type=int, default=8, help="copies of WikiText-2 test (1.3 MB each)")
  p.add_argument("--train_steps", type=int, default=30)
  p.add_argument("--no_gpt2_step", action="store_true", help="skip timing a GPT-2 small step")
  p.add_argument("--keep", action="store_true", help="keep the generated corpora")
  p.add_argument("--out", default="", help="also write the figures to this JSON file")
  p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    kind, *rest = args.child
    result = (child_pipeline(rest[0], int(rest[1])) if kind == "pipeline" else
              child_train(rest[0], rest[1], int(rest[2])))
    print(json.dumps(result))
    return 0
  work = pathlib.Path(args.work)
  work.mkdir(parents=True, exist_ok=True)
  print(f"disk free under {work}: {shutil.disk_usage(work).free / 1e9:.1f} GB", flush=True)
  figures = {"prepare": prepare_throughput(work, args.text_copies)}
  corpora = {"small64": write_generated(work / "small64", int(args.small_tokens), 64),
             "small1024": write_generated(work / "small1024", int(args.small_tokens), 1024),
             "big1024": write_generated(work / "big1024", int(args.big_tokens), 1024, seed=1)}
  figures["corpora"] = corpora
  try:
    figures["throughput"] = pipeline_vs_step(corpora["small64"]["dir"], corpora["small1024"]["dir"],
                                             corpora["big1024"]["dir"], not args.no_gpt2_step)
    figures["memory_mib"] = memory(corpora["small1024"]["dir"], corpora["big1024"]["dir"], work,
                                   args.train_steps)
  finally:
    if not args.keep:
      for c in corpora.values():
        shutil.rmtree(c["dir"], ignore_errors=True)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(figures, indent=1))
  print(json.dumps(figures, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
