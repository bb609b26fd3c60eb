"""Decode speed: the KV cache, the serving engine and Hugging Face `generate`, in the same run.

    python -m bigmodel.infer.bench_decode [--batches 1,8] [--prompt_len 64] [--new_tokens 128]
                                          [--decode_steps 1,4] [--decode_spans 1,3]
                                          [--cache_len N]
                                          [--layers 12 --d_model 768 --heads 12 --vocab 50304]
                                          [--no_loop] [--no_windowed] [--no_hf] [--threads N]

A GPT-2-small-shaped decoder (random init, float32, learned positions) continues random
prompts greedily; every row makes all its new tokens (no EOS). Timed, after a warm-up that
compiles every shape:
  cache     bigmodel.infer.decode.Generator: one prefill, then one-token steps (jitted loop)
  windowed  the former greedy_decode: a jitted loop of full forwards over the first w columns,
            w widened in steps of 16 as rows grow (the best of the old paths)
  loop      the former `bigmodel sample` (batch 1 only): one jitted forward of a fixed window
            per token, from Python; the window here is prompt + new tokens (the old command
            used DataConfig.seq_len, which for GPT-2 is 1024: slower still)
  engine/k  bigmodel.infer.engine (what `bigmodel serve` runs) with k decode steps a jitted
            call (--decode_steps; 1: one step a call): `batch` slots, the prompts submitted at
            once, prefilled in chunks (several slots a call), then decode calls whose tokens
            come back to Python after each call (streaming, joins, stops); --decode_spans 1,3
            runs a row each with attention over the whole cache row (1) and over the shortest
            of 3 spans (full, half, quarter) that holds the rows (`engine/k/s`); --cache_len:
            the engine's cache positions a row (default prompt + new tokens; `bigmodel serve`
            takes the model's max_len, 1024 for GPT-2): its "x cache" is that
            per-step overhead against the one-request decoder's on-device loop; a line under
            the table gives its host work a model call (the engine thread's time not spent
            waiting for the device)
  hf        Hugging Face transformers `GPT2LMHeadModel.generate` on PyTorch CPU (float32, KV
            cache on, greedy, the same shape, random init, the same prompts)
tokens/s counts new tokens (batch x new_tokens / seconds); ms/token is seconds / new_tokens
(one decode step of the batch, prefill included); "x cache" is each row's time over the
cache's at the same batch; the lines under the table give hf's time over cache's and
engine's. "same" is the share of rows whose tokens equal the cache's (random weights leave
near ties, where float order can flip an argmax); hf has its own random weights, so its
tokens are not compared ("-"). Threads: XLA:CPU runs on every core it is given, torch on
--threads (its default: every core); for equal work pin the process to cores (e.g. `taskset -c
1` with --threads 1: one core each).
"""

from __future__ import annotations

import argparse
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

from bigmodel.config import ModelConfig
from bigmodel.infer import decode, engine as engine_lib, greedy, sample
from bigmodel.models.decoder import Decoder


class _Ids:
  """A 'tokenizer' of space-separated ids, so that the old text loop runs on random prompts."""
  eos_id = None

  def encode(self, text):
    return [int(t) for t in text.split()]

  def decode(self, ids):
    return " ".join(str(i) for i in ids)


def _timed(fn):
  t = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t


def _args(argv):
  ap = argparse.ArgumentParser(prog="python -m bigmodel.infer.bench_decode",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--prompt_len", type=int, default=64)
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--layers", type=int, default=12)
  ap.add_argument("--d_model", type=int, default=768)
  ap.add_argument("--heads", type=int, default=12)
  ap.add_argument("--vocab", type=int, default=50304)
  ap.add_argument("--decode_steps", default="4",
                  help="the engine's decode steps a call; a list (1,4) runs one engine row each")
  ap.add_argument("--decode_spans", default="3",
                  help="the engine's attention spans; a list (1,3) runs one engine row each")
  ap.add_argument("--cache_len", type=int, default=0,
                  help="the engine's cache positions a row (0: prompt + new tokens)")
  ap.add_argument("--no_loop", action="store_true", help="skip the slow old per-token loop")
  ap.add_argument("--no_windowed", action="store_true", help="skip the former windowed decoder")
  ap.add_argument("--no_hf", action="store_true", help="skip Hugging Face generate")
  ap.add_argument("--threads", type=int, default=0, help="torch threads (0: its default)")
  return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
  args = _args(argv)
  cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers,
                    num_heads=args.heads, max_len=1024)
  model = Decoder(cfg)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  n_params = sum(x.size for x in jax.tree.leaves(params))
  p, n = args.prompt_len, args.new_tokens
  print(f"decoder {args.layers}L/{args.d_model}d/{args.heads}h, vocab {args.vocab}, "
        f"{n_params / 1e6:.1f}M params, float32; prompt {p}, {n} new tokens, greedy; "
        f"{jax.device_count()} {jax.devices()[0].platform} device(s)", flush=True)
  rng = np.random.default_rng(0)
  rows = []
  for b in [int(x) for x in args.batches.split(",")]:
    prompts = rng.integers(0, args.vocab, (b, p)).tolist()
    gen = decode.Generator(model, params)
    _, compile_s = _timed(lambda: gen(prompts, n))
    cached, secs = _timed(lambda: gen(prompts, n))
    ref = [c.tokens for c in cached]
    rows.append(dict(batch=b, method="cache", secs=secs, same=1.0, warm=compile_s))
    print(f"  batch {b}: cache {secs:.2f}s (first call, with compile: {compile_s:.1f}s)", flush=True)
    spans = [int(x) for x in args.decode_spans.split(",")]
    for k in [int(x) for x in args.decode_steps.split(",")]:
      for sp in spans:
        name = f"engine/{k}" + (f"/{sp}" if len(spans) > 1 else "")
        rows.append(_bench_engine(model, params, prompts, n, ref, k, sp, args.cache_len, name))
    if not args.no_hf:
      hf, compile_s = _timed(lambda: _HF(args))
      out, secs = _timed(lambda: hf(prompts, n))
      rows.append(dict(batch=b, method="hf", secs=secs, warm=compile_s, same=None))
      print(f"  batch {b}: hf generate {secs:.2f}s ({hf.framework})", flush=True)
    rows += _bench_former(args, model, params, prompts, ref)
  _print_table(rows, n)
  _print_floor(n_params * 4, rows, n)
  return rows


def _print_floor(n_bytes: int, rows, n) -> None:
  """The weight-read floor of a batch-1 token: every step reads all the float32 weights once;
  one thread's read bandwidth (numpy sum of an array that size, best of 3)."""
  a = np.ones(n_bytes // 4, np.float32)
  best = min(_timed(a.sum)[1] for _ in range(3))
  print(f"one thread reads {n_bytes / best / 1e9:.1f} GB/s here: the {n_bytes / 1e9:.2f} GB of "
        f"weights take >= {best * 1e3:.1f} ms a batch-1 token", end="")
  ms = {r["method"]: r["secs"] / n * 1e3 for r in rows if r["batch"] == 1}
  if ms:
    print(" (" + ", ".join(f"{m} {v / (best * 1e3):.2f}x it" for m, v in ms.items()) + ")")
  else:
    print()


def _bench_engine(model, params, prompts, n, ref, k, spans, cache_len, name) -> dict:
  """The engine with `k` decode steps a call and `spans` attention spans: its time, and its
  host work a model call."""
  b, p = len(prompts), len(prompts[0])
  eng = engine_lib.Engine(model, params, None, slots=b, max_len=cache_len or p + n,
                          prefix_cache_mb=0, decode_steps=k, decode_spans=spans)
  _, compile_s = _timed(eng.warmup)
  eng.start()
  _engine_run(eng, prompts, n)
  before = dict(eng.stats)
  out, secs = _timed(lambda: _engine_run(eng, prompts, n))
  eng.stop()
  keys = ("device_wait_s", "decode_steps", "decode_calls", "prefill_calls")
  d = {key: eng.stats[key] - before.get(key, 0) for key in keys}
  host = (secs - d["device_wait_s"]) / (d["decode_calls"] + d["prefill_calls"])
  share = 1 - d["device_wait_s"] / secs
  print(f"  batch {b}: {name} {secs:.2f}s ({d['decode_steps']} decode steps in "
        f"{d['decode_calls']} calls, {d['prefill_calls']} prefill calls; host work "
        f"{host * 1e3:.1f} ms a call, {share:.0%} of its time)", flush=True)
  return dict(batch=b, method=name, secs=secs, warm=compile_s, host=host, share=share,
              same=np.mean([o == r for o, r in zip(out, ref)]))


def _bench_former(args, model, params, prompts, ref) -> list[dict]:
  """The former decoders: the windowed one, and (batch 1) the per-token loop."""
  b, p, n = len(prompts), args.prompt_len, args.new_tokens
  window, rows = p + n, []
  if args.no_windowed:
    return rows
  run = lambda warm=False: greedy.greedy_decode_windowed(model, params, prompts, window, None, n,
                                                         batch_size=b, warm_only=warm)
  _, compile_s = _timed(lambda: run(True))
  old, secs = _timed(run)
  rows.append(dict(batch=b, method="windowed", secs=secs, warm=compile_s,
                   same=np.mean([o == r for o, r in zip(old, ref)])))
  print(f"  batch {b}: windowed {secs:.2f}s (compiles: {compile_s:.1f}s)", flush=True)
  if b == 1 and not args.no_loop:
    tok, text = _Ids(), " ".join(map(str, prompts[0]))
    loop = lambda k: sample.generate_windowed(model, params, tok, text, k, window, temperature=0.0)
    _, compile_s = _timed(lambda: loop(1))
    out, secs = _timed(lambda: loop(n))
    rows.append(dict(batch=b, method="loop", secs=secs, warm=compile_s,
                     same=float(tok.encode(out)[p:] == ref[0])))
    print(f"  batch {b}: loop {secs:.2f}s", flush=True)
  return rows


def _print_table(rows, n) -> None:
  print()
  print("| batch | method     | new tokens/s | seconds | ms/token | x cache | same tokens |")
  print("|------:|------------|-------------:|--------:|---------:|--------:|------------:|")
  secs = {(r["batch"], r["method"]): r["secs"] for r in rows}
  for r in rows:
    base = secs[r["batch"], "cache"]
    print(f"| {r['batch']:5d} | {r['method']:10s} | {r['batch'] * n / r['secs']:12.1f} | "
          f"{r['secs']:7.2f} | {r['secs'] / n * 1e3:8.1f} | {r['secs'] / base:7.2f} | "
          f"{'-' if r['same'] is None else format(r['same'], '.0%'):>11s} |")
  for r in rows:
    if "host" in r:
      print(f"batch {r['batch']}: {r['method']}: host work (Python, dispatch, requests) "
            f"{r['host'] * 1e3:.1f} ms a model call, {r['share']:.0%} of its time; its time "
            f"{r['secs'] / secs[r['batch'], 'cache']:.2f}x the one-request decoder's")
  for r in rows:
    if r["method"].startswith("engine") and (r["batch"], "hf") in secs:
      b = r["batch"]
      print(f"batch {b}: hf generate takes {secs[b, 'hf'] / secs[b, 'cache']:.2f}x the cache's "
            f"time and {secs[b, 'hf'] / r['secs']:.2f}x {r['method']}'s")


def _engine_run(eng, prompts, n):
  """All prompts submitted at once; their tokens, in order."""
  done = [threading.Event() for _ in prompts]
  toks = [[] for _ in prompts]

  def on_event(i):
    def f(ev):
      toks[i].extend(ev.tokens)
      if ev.finish_reason:
        done[i].set()
    return f
  params = engine_lib.SamplingParams(max_tokens=n, ignore_eos=True)
  for i, p in enumerate(prompts):
    eng.submit(p, params, on_event(i))
  for d in done:
    d.wait()
  return toks


class _HF:
  """GPT2LMHeadModel at the decoder's shape: `generate`, greedy, KV cache on, every new token."""

  def __init__(self, args):
    import torch
    import transformers
    if args.threads:
      torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    self.torch = torch
    self.framework = f"transformers {transformers.__version__} / torch {torch.__version__}, " \
                     f"{torch.get_num_threads()} threads"
    cfg = transformers.GPT2Config(vocab_size=args.vocab, n_positions=1024, n_embd=args.d_model,
                                  n_layer=args.layers, n_head=args.heads, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    self.model = transformers.GPT2LMHeadModel(cfg).eval()
    self([[1] * 8], 2)                           # warm-up

  def __call__(self, prompts, n):
    ids = self.torch.tensor(prompts)
    with self.torch.inference_mode():
      out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=n,
                                min_new_tokens=n, do_sample=False, use_cache=True,
                                pad_token_id=0, eos_token_id=None)
    return out[:, ids.shape[1]:].tolist()


if __name__ == "__main__":
  main()
