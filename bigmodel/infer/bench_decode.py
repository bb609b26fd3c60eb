"""Decode speed: the KV cache against the former decoders without one, in the same run.

    python -m bigmodel.infer.bench_decode [--batches 1,8] [--prompt_len 64] [--new_tokens 128]
                                          [--layers 12 --d_model 768 --heads 12 --vocab 50304]
                                          [--no_loop]

A GPT-2-small-shaped decoder (random init, float32, learned positions) continues random
prompts greedily; every row makes all its new tokens (no EOS). Timed, after a warm-up that
compiles every shape:
  cache     bigmodel.infer.decode.Generator: one prefill, then one-token steps (jitted loop)
  windowed  the former greedy_decode: a jitted loop of full forwards over the first w columns,
            w widened in steps of 16 as rows grow (the best of the old paths)
  loop      the former `bigmodel sample` (batch 1 only): one jitted forward of a fixed window
            per token, from Python; the window here is prompt + new tokens (the old command
            used DataConfig.seq_len, which for GPT-2 is 1024: slower still)
tokens/s counts new tokens (batch x new_tokens / seconds); "x cache" is each row's time over
the cache's at the same batch. "same" is the share of rows whose tokens equal the cache's
(random weights leave near ties, where float order can flip an argmax).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from bigmodel.config import ModelConfig
from bigmodel.infer import decode, greedy, sample
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


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(prog="python -m bigmodel.infer.bench_decode",
                               description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--prompt_len", type=int, default=64)
  ap.add_argument("--new_tokens", type=int, default=128)
  ap.add_argument("--layers", type=int, default=12)
  ap.add_argument("--d_model", type=int, default=768)
  ap.add_argument("--heads", type=int, default=12)
  ap.add_argument("--vocab", type=int, default=50304)
  ap.add_argument("--no_loop", action="store_true", help="skip the slow old per-token loop")
  args = ap.parse_args(argv)
  cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers,
                    num_heads=args.heads, max_len=1024)
  model = Decoder(cfg)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  n_params = sum(x.size for x in jax.tree.leaves(params))
  p, n = args.prompt_len, args.new_tokens
  window = p + n
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
  print()
  print("| batch | method   | new tokens/s | seconds | x cache | same tokens |")
  print("|------:|----------|-------------:|--------:|--------:|------------:|")
  for r in rows:
    base = next(x["secs"] for x in rows if x["batch"] == r["batch"] and x["method"] == "cache")
    print(f"| {r['batch']:5d} | {r['method']:8s} | {r['batch'] * n / r['secs']:12.1f} | "
          f"{r['secs']:7.2f} | {r['secs'] / base:7.2f} | {r['same']:11.0%} |")
  return rows


if __name__ == "__main__":
  main()
