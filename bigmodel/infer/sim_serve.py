"""The engine's scheduler under bench_serve's load, on a virtual clock: no model runs.

    python -m bigmodel.infer.sim_serve [--clients 1,8,32] [--requests 32] [--slots 8]
        [--prompt_lens 16,32,64,128] [--new_tokens 16,32,64] [--max_len 256]
        [--chunks 16,64] [--prefill_rows 1,2,4] [--prefill_budget 256] [--decode_steps 4]
        [--step_ms 100] [--token_ms 1] [--row_ms 2.3] [--cost add] [--think_ms 5] [--show 1]

The real Engine (its scheduler: admission, prefill order and grouping, the choice of decode
steps a call) drives stand-ins for its jitted calls that return token 0 and move a virtual clock
by a cost model instead of computing: a prefill call costs step_ms + rows x chunk x token_ms
(padding runs too), a decode step step_ms + rows x row_ms, a call of k steps k of those (`--cost
max`: max(step_ms, tokens x ms) instead, a compute-bound model). The defaults are GPT-2 small in
float32 on this 2-core CPU as bench_serve saw it at load 18 (README "Serving"), scaled to ~100 ms
a weight read: a 1x64 prefill call took about one decode step (TTFT p50 0.76 s against 0.89 s a
token at 1 client), 8 decoding rows ~1.18x one row; a guess, not a measurement of the costs one
by one. Clients are closed-loop as in bench_serve (the same requests: prompt lengths and new-
token counts cycled, no EOS): client c sends its first request at c x think_ms, and its next one
think_ms after its last one ended (the HTTP round trip); requests arriving while a call runs are
queued when it ends, so they wait for it as on the real engine. Deterministic: no host load
moves it. Prints, per level, what bench_serve prints on the engine's clock (model calls between
a request's submit and its first token, p50/p99) with their kinds, and the modelled seconds;
`--show N` lists the calls the N slowest first tokens waited for.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq

import numpy as np


class _Clock:
  """Virtual time, the calls run (start, end, kind, rows, size) and the arrivals still to come."""

  def __init__(self, step_s: float, token_s: float, row_s: float, cost: str = "add"):
    self.now, self.step_s, self.token_s, self.row_s, self.cost = 0.0, step_s, token_s, row_s, cost
    self.calls: list[tuple[float, float, str, int, int]] = []
    self.arrivals: list = []               # heap of (time, seq, submit function)
    self.seq = 0

  def run(self, kind: str, rows: int, size: int, tokens: int, repeat: int = 1) -> None:
    start = self.now
    per = tokens * (self.token_s if kind == "prefill" else self.row_s)
    self.now += repeat * (self.step_s + per if self.cost == "add" else max(self.step_s, per))
    self.calls.append((start, self.now, kind, rows, size))
    self.deliver()

  def at(self, t: float, submit) -> None:
    heapq.heappush(self.arrivals, (t, self.seq, submit))
    self.seq += 1

  def deliver(self) -> None:
    while self.arrivals and self.arrivals[0][0] <= self.now:
      heapq.heappop(self.arrivals)[2]()


@contextlib.contextmanager
def stub_calls(clock: _Clock):
  """The engine's jitted calls replaced by the clock's cost model for the duration."""
  from bigmodel.infer import engine as E
  saved = E._decode_jit, E._prefill_jit, E._read_page_jit, E._write_page_jit

  def dec(model, params, cache, tokens, active, *rest, k):
    clock.run(f"decode{k}", int(np.sum(active)), k, int(np.sum(active)), repeat=k)
    return cache, np.zeros((k, len(tokens)), np.int32)

  def pre(model, params, cache, slots, tokens, *rest):
    clock.run("prefill", tokens.shape[0], tokens.shape[1], tokens.size)
    return cache, np.zeros(tokens.shape[0], np.int32)
  E._decode_jit, E._prefill_jit = dec, pre
  E._read_page_jit = E._write_page_jit = None         # no prefix store in the simulation
  try:
    yield
  finally:
    E._decode_jit, E._prefill_jit, E._read_page_jit, E._write_page_jit = saved


def tiny_engine(args):
  """An Engine with bench_serve's settings on a one-layer model (its shape does not matter:
  no call computes)."""
  import jax
  import jax.numpy as jnp
  from bigmodel.config import ModelConfig
  from bigmodel.infer import engine as E
  from bigmodel.models.decoder import Decoder
  cfg = ModelConfig(vocab_size=64, d_model=8, num_layers=1, num_heads=1, max_len=1024)
  model = Decoder(cfg)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  ints = lambda s: [int(x) for x in str(s).split(",")]
  return E.Engine(model, params, None, slots=args.slots, max_len=args.max_len,
                  chunk_sizes=ints(args.chunks), prefill_rows=ints(args.prefill_rows),
                  prefill_budget=args.prefill_budget, max_queue=1024, prefix_cache_mb=0,
                  decode_steps=args.decode_steps)


def run_level(eng, clock: _Clock, requests: list[tuple[int, int]], clients: int,
              think_s: float) -> list[dict]:
  """Serves the requests to `clients` closed-loop clients; one record a request."""
  from bigmodel.infer.engine import SamplingParams
  todo, records = list(requests), []

  def send():
    plen, new = todo.pop(0)
    rec = dict(prompt=plen, new=new, submit=clock.now, first=None, end=None)
    records.append(rec)

    def on_event(ev):
      if ev.tokens and rec["first"] is None:
        rec["first"] = clock.now
      if ev.finish_reason:
        rec["end"] = clock.now
        if todo:
          clock.at(clock.now + think_s, send)
    eng.submit([1] * plen, SamplingParams(max_tokens=new, ignore_eos=True), on_event)
  for c in range(min(clients, len(todo))):
    clock.at(clock.now + c * think_s, send)
  while True:
    clock.deliver()
    if not (eng._waiting or any(s is not None for s in eng._active)):
      if not clock.arrivals:
        return records
      clock.now = clock.arrivals[0][0]
      continue
    eng.step()


def waited(rec: dict, calls) -> list[tuple]:
  """The calls that ended after the request's submit, up to its first token (that call too)."""
  return [c for c in calls if rec["submit"] < c[1] <= rec["first"]]


def summary(records: list[dict], calls, clients: int) -> dict:
  ttft = np.array([r["first"] - r["submit"] for r in records])
  w = [waited(r, calls) for r in records]
  n = np.array([len(x) for x in w])
  steps = np.array([sum(c[4] for c in x if c[2].startswith("decode")) for x in w])
  pre = np.array([sum(c[2] == "prefill" for c in x) for x in w])
  wall = max(r["end"] for r in records) - min(r["submit"] for r in records)
  worst = int(np.argsort(ttft, kind="stable")[-1])
  return dict(clients=clients, tps=sum(r["new"] for r in records) / wall,
              ttft=np.percentile(ttft, [50, 99]), calls=np.percentile(n, [50, 99]),
              clock=np.percentile(steps + pre, [50, 99]), decode_p99=np.percentile(steps, 99),
              worst=(records[worst], w[worst]), order=np.argsort(-ttft, kind="stable"), waits=w,
              records=records)


def _args(argv):
  ap = argparse.ArgumentParser(prog="python -m bigmodel.infer.sim_serve", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  for name, default in [("clients", "1,8,32"), ("prompt_lens", "16,32,64,128"),
                        ("new_tokens", "16,32,64"), ("chunks", "16,64"), ("prefill_rows", "1,2,4")]:
    ap.add_argument(f"--{name}", default=default)
  for name, default in [("requests", 32), ("slots", 8), ("max_len", 256), ("prefill_budget", 256),
                        ("decode_steps", 4), ("show", 0)]:
    ap.add_argument(f"--{name}", type=int, default=default)
  for name, default in [("step_ms", 100.0), ("token_ms", 1.0), ("row_ms", 2.3), ("think_ms", 5.0)]:
    ap.add_argument(f"--{name}", type=float, default=default)
  ap.add_argument("--cost", choices=["add", "max"], default="add")
  return ap.parse_args(argv)


def _describe(call, t0: float) -> str:
  start, end, kind, rows, size = call
  what = f"prefill {rows}x{size}" if kind == "prefill" else f"{kind} ({rows} rows)"
  return f"{what} {1e3 * (start - t0):.0f}-{1e3 * (end - t0):.0f}ms"


def main(argv=None) -> list[dict]:
  args = _args(argv)
  plens = [int(x) for x in args.prompt_lens.split(",")]
  news = [int(x) for x in args.new_tokens.split(",")]
  requests = [(plens[i % len(plens)], news[(i // len(plens)) % len(news)])
              for i in range(args.requests)]
  rows = []
  for c in [int(x) for x in args.clients.split(",")]:
    clock = _Clock(args.step_ms / 1e3, args.token_ms / 1e3, args.row_ms / 1e3, args.cost)
    with stub_calls(clock):
      eng = tiny_engine(args)
      rows.append(summary(run_level(eng, clock, requests, c, args.think_ms / 1e3), clock.calls, c))
  base = next((r["tps"] for r in rows if r["clients"] == 1), rows[0]["tps"])
  print(f"simulated engine: {args.slots} slots, chunks {args.chunks}, prefill rows "
        f"{args.prefill_rows}, budget {args.prefill_budget}, decode_steps {args.decode_steps}; "
        f"cost {args.cost}: step {args.step_ms:g} ms, prefill token {args.token_ms:g} ms, decode "
        f"row {args.row_ms:g} ms; think "
        f"{args.think_ms:g} ms; {args.requests} requests, prompts {plens}, new {news}")
  print("| clients | tokens/s | x 1 client | TTFT p50 | TTFT p99 | TTFT calls p50/p99 "
        "| clock p50/p99 (decode p99) |")
  print("|--------:|---------:|-----------:|---------:|---------:|-------------------:"
        "|---------------------------:|")
  for r in rows:
    print(f"| {r['clients']:7d} | {r['tps']:8.1f} | {r['tps'] / base:10.2f} | {r['ttft'][0]:7.2f}s "
          f"| {r['ttft'][1]:7.2f}s | {r['calls'][0]:8.0f}/{r['calls'][1]:<9.0f} "
          f"| {r['clock'][0]:8.0f}/{r['clock'][1]:<4.0f} ({r['decode_p99']:.0f}) |")
  for r in rows:
    for j in r["order"][:args.show]:
      rec, w = r["records"][j], r["waits"][j]
      print(f"{r['clients']} clients, request {j} (prompt {rec['prompt']}): TTFT "
            f"{1e3 * (rec['first'] - rec['submit']):.0f} ms after "
            + ", ".join(_describe(c, rec["submit"]) for c in w))
  return rows


if __name__ == "__main__":
  main()
