"""Load benchmark of `bigmodel serve`: N concurrent streaming clients against one at a time.

    python -m bigmodel.infer.bench_serve [--clients 1,8,32] [--requests 32] [--slots 16]
        [--prompt_lens 16,32,64,128] [--new_tokens 16,32,64] [--max_len 256]
        [--layers 12 --d_model 768 --heads 12 --vocab 50304]     # GPT-2 small (random init)
        [--chunks 16,64] [--prefill_rows 1,2,4] [--prefill_budget 256] [--decode_steps 4]
                                                                  # the engine's settings

The server is the real one (bigmodel.infer.api on uvicorn, the engine behind it) on a free
localhost port in this process; each client is a thread that sends POST /v1/completions with
`stream: true` and reads the server-sent events, one request after another from a shared list.
Every level serves the same requests (prompt lengths and new-token counts cycled from the
lists, greedy, no EOS: prompts and replies are token ids written as numbers), so `clients 1`
is the same requests served one at a time by the same engine, and "x 1 client" is each level's
generated tokens/s over it. TTFT: request sent -> first token's event received. Per-token
latency: (last token - first token) / (tokens - 1) of each request. p50/p99 over requests.
"TTFT calls" is the same wait on the engine's clock, which host load does not stretch: the
model calls (decode steps + prefill calls) the engine ran between a request's submit and its
first token, p50/p99, and the decode steps alone among them at p99. "load": the host's 1-minute
load average at the end of the level (other jobs on the host stretch every time here).
The default prompts (16-128 tokens) are a support assistant's: a customer's question with a
little context. Compiled programs go to the persistent cache of `bigmodel serve`
($BIGMODEL_COMPILE_CACHE), so a second run starts in seconds. The same load on a virtual clock,
without a model (the scheduler alone, deterministic): python -m bigmodel.infer.sim_serve.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import threading
import time

import numpy as np


class Ids:
  """A 'tokenizer' of numbers: text " 12 7 301" <-> ids [12, 7, 301] (no EOS)."""
  eos_id = None

  def __init__(self, vocab_size: int):
    self.vocab_size = vocab_size

  def encode(self, text: str) -> list[int]:
    return [int(t) for t in text.split()]

  def decode(self, ids) -> str:
    return "".join(f" {int(i)}" for i in ids)


def _stream(port: int, body: dict) -> tuple[float, list[float], int]:
  """(sent time, the arrival time of each event with text, tokens counted from the text)."""
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
  sent = time.perf_counter()
  conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
  resp = conn.getresponse()
  if resp.status != 200:
    raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
  times, tokens = [], 0
  for line in resp:
    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
      continue
    text = json.loads(line[6:])["choices"][0]["text"]
    if text:
      n = len(text.split())
      times += [time.perf_counter()] * n
      tokens += n
  conn.close()
  return sent, times, tokens


def run_level(port: int, requests: list[dict], clients: int) -> dict:
  todo = list(enumerate(requests))
  lock = threading.Lock()
  results = []

  def client():
    while True:
      with lock:
        if not todo:
          return
        _, body = todo.pop(0)
      results.append(_stream(port, body))

  start = time.perf_counter()
  threads = [threading.Thread(target=client) for _ in range(clients)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  wall = time.perf_counter() - start
  tokens = sum(n for _, _, n in results)
  ttft = [times[0] - sent for sent, times, _ in results if times]
  tpot = [(times[-1] - times[0]) / (len(times) - 1) for _, times, _ in results if len(times) > 1]
  return dict(clients=clients, requests=len(results), tokens=tokens, wall=wall,
              tps=tokens / wall, ttft=np.percentile(ttft, [50, 99]), tpot=np.percentile(tpot, [50, 99]))


def _server(app):
  import uvicorn
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
  threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True).start()
  while not srv.started:
    time.sleep(0.05)
  return srv, sock.getsockname()[1]


def _args(argv):
  ap = argparse.ArgumentParser(prog="python -m bigmodel.infer.bench_serve", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--clients", default="1,8,32")
  ap.add_argument("--requests", type=int, default=32, help="requests per level")
  ap.add_argument("--slots", type=int, default=16)
  ap.add_argument("--prompt_lens", default="16,32,64,128")
  ap.add_argument("--new_tokens", default="16,32,64")
  ap.add_argument("--max_len", type=int, default=256)
  ap.add_argument("--layers", type=int, default=12)
  ap.add_argument("--d_model", type=int, default=768)
  ap.add_argument("--heads", type=int, default=12)
  ap.add_argument("--vocab", type=int, default=50304)
  ap.add_argument("--chunks", default="16,64", help="prefill chunk sizes")
  ap.add_argument("--prefill_rows", default="1,2,4", help="slots' chunks a prefill call may run")
  ap.add_argument("--prefill_budget", type=int, default=256,
                  help="prompt tokens an engine step prefills while others decode")
  ap.add_argument("--decode_steps", type=int, default=4, help="decode steps a jitted call")
  return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
  args = _args(argv)
  from bigmodel import cli
  cli._compile_cache()
  import jax
  import jax.numpy as jnp
  from bigmodel.config import ModelConfig
  from bigmodel.infer import api, engine as engine_lib
  from bigmodel.models.decoder import Decoder

  cfg = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers,
                    num_heads=args.heads, max_len=1024)
  model = Decoder(cfg)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  tok = Ids(args.vocab)
  ints = lambda s: [int(x) for x in s.split(",")]
  eng = engine_lib.Engine(model, params, tok, slots=args.slots, max_len=args.max_len,
                          chunk_sizes=ints(args.chunks), prefill_rows=ints(args.prefill_rows),
                          prefill_budget=args.prefill_budget, max_queue=1024, prefix_cache_mb=0,
                          decode_steps=args.decode_steps)
  t = time.perf_counter()
  eng.warmup()
  eng.start()
  warm_s = time.perf_counter() - t
  fmt = api.ChatFormat(tok, "{prompt}", [])
  srv, port = _server(api.make_app(api.Service(eng, tok, fmt, model_name="bench")))
  rng = np.random.default_rng(0)
  plens = [int(x) for x in args.prompt_lens.split(",")]
  news = [int(x) for x in args.new_tokens.split(",")]
  requests = [{"prompt": tok.decode(rng.integers(0, args.vocab, plens[i % len(plens)])),
               "max_tokens": news[(i // len(plens)) % len(news)], "temperature": 0, "stream": True}
              for i in range(args.requests)]
  print(f"decoder {args.layers}L/{args.d_model}d/{args.heads}h, vocab {args.vocab}, float32, "
        f"random init; engine: {args.slots} slots x {args.max_len} positions, chunks "
        f"{eng.chunk_sizes}, up to {eng.prefill_rows[-1]} rows a prefill call, prefill budget "
        f"{eng.prefill_budget} tokens a step, {eng.decode_steps} decode steps a call when none "
        f"waits (compiled in {warm_s:.1f}s); {args.requests} streaming requests a "
        f"level, prompts {plens} tokens, {news} new tokens, greedy; over HTTP on localhost",
        flush=True)
  _stream(port, dict(requests[0], max_tokens=2))        # a first request through every layer
  rows = []
  for c in [int(x) for x in args.clients.split(",")]:
    steps0, rows0 = eng.stats["decode_steps"], eng.stats["decode_rows"]
    eng.first_tokens.clear()
    r = run_level(port, requests, c)
    calls = np.array([list(x) for x in eng.first_tokens])      # (decode steps, prefill calls)
    r["ttft_calls"] = np.percentile(calls.sum(1), [50, 99])
    r["ttft_decode_steps"] = np.percentile(calls[:, 0], 99)
    r["rows_per_step"] = (eng.stats["decode_rows"] - rows0) / max(eng.stats["decode_steps"] - steps0, 1)
    r["load"] = os.getloadavg()[0]
    rows.append(r)
    print(f"  {c} clients: {r['tokens']} tokens in {r['wall']:.1f}s (load average {r['load']:.1f})",
          flush=True)
  srv.should_exit = True
  eng.stop()
  base = next((r["tps"] for r in rows if r["clients"] == 1), rows[0]["tps"])
  print()
  print("| clients | tokens/s | x 1 client | TTFT p50 | TTFT p99 | TTFT calls p50/p99 (decode p99) "
        "| per-token p50 | per-token p99 | rows/step | load |")
  print("|--------:|---------:|-----------:|---------:|---------:|--------------------:"
        "|--------------:|--------------:|----------:|-----:|")
  for r in rows:
    calls = f"{r['ttft_calls'][0]:.0f}/{r['ttft_calls'][1]:.0f} ({r['ttft_decode_steps']:.0f})"
    print(f"| {r['clients']:7d} | {r['tps']:8.1f} | {r['tps'] / base:10.2f} | {r['ttft'][0]:7.2f}s | "
          f"{r['ttft'][1]:7.2f}s | {calls:>19s} | {r['tpot'][0] * 1e3:11.1f}ms | "
          f"{r['tpot'][1] * 1e3:11.1f}ms | {r['rows_per_step']:9.1f} | {r['load']:4.1f} |")
  return rows


if __name__ == "__main__":
  main()
