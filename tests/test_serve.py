"""Serving (bigmodel.infer.engine, .api, .serve): continuous batching against one-at-a-time
and the former decoder, no compiles while serving, prefill first in batched calls, chunked
prefill between decode steps within a budget, stop strings, prefix reuse across chat turns,
the official `openai` client against the server on localhost (completions and chat, streaming
and not), errors, 503, API key, disconnects, and the inference commands' start without
TensorFlow. One tiny run and one server for the module."""

import concurrent.futures
import http.client
import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import openai
import pytest
import uvicorn

from bigmodel import cli, config
from bigmodel.infer import api, chat, decode, engine as engine_lib, restore, serve
from bigmodel.infer.engine import SamplingParams

from tests.helpers import ROOT, decoder_workdir

KEY = "test-key"
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A tiny random-init byte-level GPT run (max_len 64) as `bigmodel train` writes one, and its
  restored model, params, tokenizer and experiment."""
  from bigmodel.train import loop
  work = pathlib.Path(decoder_workdir(tmp_path_factory.mktemp("serve") / "run",
                                      **{"ModelConfig.init_std": 0.5}))
  exp = config.load([str(work / "config.gin")], [])
  model, params, tok, step = restore.restore_decoder(str(work), exp)
  assert step == 3
  want = jax.tree.leaves(loop.restore_for_inference(str(work), exp)[1])   # the same params
  assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), want))
  return dict(workdir=str(work), exp=exp, model=model, params=params, tok=tok)


@pytest.fixture(scope="module")
def server(run):
  """The app of `bigmodel serve` (4 slots) on a free localhost port, with an API key."""
  app, eng = serve.build_app(run["exp"], run["model"], run["params"], run["tok"], step=3, slots=4,
                             max_queue=8, model_name="tiny", max_batch=4, api_key=KEY)
  assert eng.max_len == 64
  sock = socket.socket()
  sock.bind(("127.0.0.1", 0))
  srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
  thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  for _ in range(200):
    if srv.started:
      break
    time.sleep(0.05)
  base = f"http://127.0.0.1:{sock.getsockname()[1]}"
  yield dict(base=base, engine=eng, app=app, client=openai.OpenAI(base_url=base + "/v1", api_key=KEY,
                                                                  max_retries=0, timeout=60))
  srv.should_exit = True
  thread.join(10)
  eng.stop()


def _engine(run, **kw):
  kw = {"slots": 4, "chunk_sizes": (8, 16), "prefill_rows": (1, 2), "page": 16, **kw}
  return engine_lib.Engine(run["model"], run["params"], run["tok"], **kw)


# ----------------------------------------------------------------------------- the engine


def test_batching_equals_one_at_a_time_without_compiles(run):
  eng = _engine(run, prefix_cache_mb=0)      # no reuse: every request prefills all its prompt
  eng.warmup()
  compiles = engine_lib.compile_counts()
  eng.start()
  try:
    tok = run["tok"]
    prompts = [tok.encode(p) for p in ["the king", "a", "Once upon a time there was a model that",
                                       "xyz", "hello there, friend", "0123456789" * 4]]
    settings = [GREEDY, GREEDY, GREEDY, GREEDY,
                SamplingParams(max_tokens=10, temperature=0.9, top_k=20, seed=5, ignore_eos=True),
                SamplingParams(max_tokens=9, temperature=1.2, top_p=0.8, seed=7, ignore_eos=True)]
    alone = [eng.generate(p, s) for p, s in zip(prompts, settings)]
    with concurrent.futures.ThreadPoolExecutor(6) as ex:     # 6 requests on 4 slots
      together = list(ex.map(lambda a: eng.generate(*a), zip(prompts, settings)))
    assert [r.tokens for r in together] == [r.tokens for r in alone]
    assert [r.text for r in together] == [tok.decode(r.tokens) for r in alone]
    assert all(len(r.tokens) == s.max_tokens and r.finish_reason == "length"
               for r, s in zip(alone, settings))
    assert all(r.prefilled == len(p) for r, p in zip(together, prompts))
    # greedy rows equal the one-request decoder (bigmodel.infer.decode)
    ref = decode.Generator(eng.model, eng.params)(prompts[:4], 12)
    assert [r.tokens for r in alone[:4]] == [c.tokens for c in ref]
    assert engine_lib.compile_counts() == compiles       # nothing compiled while serving
    assert eng.load() == {"slots": 4, "active": 0, "waiting": 0}
    # alone, a request decodes 4 steps a call (decode_steps), trimmed to its max_tokens
    assert eng.stats["decode_calls"] < eng.stats["decode_steps"]
    # decode calls attended to the cache's first 16 or 32 slots while the rows were that short
    assert eng.spans == (16, 32, 64)
    assert eng.stats["decode_span_slots"] < 64 * eng.stats["decode_calls"]
  finally:
    eng.stop()


def test_sampling_filters_without_a_full_sort():
  """Per-row top-k / top-p (engine._filter_rows): pure top-k rows through lax.top_k, others
  through decode.filter_logits' sort, rows asking for neither unchanged: the same kept set as
  filter_logits row by row, whichever path the batch takes."""
  logits = jax.random.normal(jax.random.key(0), (4, 300)) * 3
  logits = logits.at[0, :5].set(9.0)                            # ties at the k-th value
  settings = [((3, 1.0), (0, 1.0), (40, 1.0), (7, 1.0)),        # top-k only: lax.top_k
              ((3, 1.0), (0, 0.8), (300, 1.0), (0, 1.0)),       # a top-p row: the full sort
              ((0, 1.0),) * 4]                                  # nothing to filter
  rows_filter = jax.jit(engine_lib._filter_rows)           # one compile each
  one_row = jax.jit(lambda x, k, p: decode.filter_logits(x[None], k, p)[0])
  for rows in settings:
    k, p = (np.array(x) for x in zip(*rows))
    got = rows_filter(logits, k.astype(np.int32), p.astype(np.float32))
    want = [one_row(logits[i], np.int32(k[i]), np.float32(p[i])) if k[i] > 0 or p[i] < 1
            else logits[i] for i in range(4)]
    np.testing.assert_array_equal(got, np.stack(want))
  three = rows_filter(logits, np.array([3, 0, 0, 0], np.int32), np.ones(4, np.float32))
  assert int(np.isfinite(three[0]).sum()) == 5


def test_prefill_goes_first_in_batched_calls(run):
  """A burst of prompts gets its first tokens before any decode step, several slots' chunks of
  one size a call; the tokens equal the one-request decoder's."""
  eng = _engine(run, prefix_cache_mb=0)        # 4 slots, chunks (8, 16), up to 2 rows a call
  tok = run["tok"]
  prompts = [tok.encode(t) for t in ["a", "the king", "x" * 20, "hello", "y" * 12]]
  got = [[] for _ in prompts]
  done = [threading.Event() for _ in prompts]
  handles = [eng.submit(p, SamplingParams(max_tokens=6, ignore_eos=True),
                        lambda ev, i=i: (got[i].extend(ev.tokens), ev.finish_reason and done[i].set()))
             for i, p in enumerate(prompts)]
  eng.start()
  try:
    assert all(d.wait(60) for d in done)
  finally:
    eng.stop()
  # calls: [a, the king] (8), [x*20: 16], [x*20 rest, hello] (8); the 5th waits for a slot: (16)
  assert (eng.stats["prefill_calls"], eng.stats["prefill_chunks"]) == (4, 6)
  assert [h.ttft_calls for h in handles[:4]] == [(0, 1), (0, 1), (0, 3), (0, 3)]
  assert handles[4].ttft_calls[0] > 0                       # it waited for a slot
  assert got == [c.tokens for c in decode.Generator(eng.model, eng.params)(prompts, 6)]


def test_time_to_first_token_policy_on_the_engine_clock(run):
  """Driven step by step (Engine.step, no thread): a request that arrives while others decode
  gets its first token from its prefill call, with no decode call before it; one that arrives
  during a prefill call joins that step's prefill instead of waiting for its decode call; while
  a request waits for a slot the decode call runs one step (not decode_steps); and the tokens
  equal the one-request decoder's."""
  eng = _engine(run, prefix_cache_mb=0, decode_steps=4)     # 4 slots, chunks (8, 16), rows (1, 2)
  tok = run["tok"]
  got, handles = {}, {}

  def submit(name, text, n, then=None):
    def on_event(ev):
      if ev.tokens and not got[name] and then:
        then()
      got[name] += ev.tokens
    got[name] = []
    handles[name] = eng.submit(tok.encode(text), SamplingParams(max_tokens=n, ignore_eos=True),
                               on_event)
  submit("d", "hello there", 30)
  eng.step()                                   # d: prefill, then 4 decode steps in one call
  assert eng.clock() == (4, 1) and handles["d"].ttft_calls == (0, 1)
  submit("a", "the king", 12, then=lambda: submit("b", "x" * 20, 12))   # b comes during a's call
  eng.step()
  assert handles["a"].ttft_calls == (0, 1)     # its own prefill call, no decode call before it
  assert handles["b"].ttft_calls == (0, 2)     # its two chunks (16 + 8), in the same step
  submit("c", "a", 12)
  submit("e", "xyz", 12)                       # 4 slots taken: e waits for one
  steps = eng.clock()[0]
  eng.step()
  assert eng.clock()[0] - steps == 1 and handles["c"].ttft_calls == (0, 1)
  while eng.load()["active"] or eng.load()["waiting"]:
    eng.step()
  names = ["d", "a", "b", "c", "e"]
  ref = decode.Generator(eng.model, eng.params)([handles[n].prompt for n in names],
                                                max(len(got[n]) for n in names))
  assert [got[n] for n in names] == [r.tokens[:len(got[n])] for n, r in zip(names, ref)]
  assert eng.stats["decode_calls"] < eng.stats["decode_steps"]     # multi-step calls ran too


def test_chunked_prefill_runs_between_decode_steps_and_stop_strings(run):
  eng = _engine(run, prefix_cache_mb=0, prefill_budget=16).start()   # one chunk a step
  try:
    tok = run["tok"]
    counts, seen = [], threading.Event()

    def short_event(ev):
      counts.append(len(ev.tokens))
      if len(counts) == 2:
        seen.set()
    h = eng.submit(tok.encode("hi"), SamplingParams(max_tokens=40, ignore_eos=True), short_event)
    seen.wait(30)
    before = sum(counts)
    chunks0 = eng.stats["prefill_chunks"]
    res = eng.generate(tok.encode("x" * 40), SamplingParams(max_tokens=2, ignore_eos=True))
    assert res.prefilled == 40 and eng.stats["prefill_chunks"] - chunks0 == 3   # 16 + 16 + 8
    # while it decodes, the short request got a token after each of the long prompt's first two
    # chunks at least (the prefill budget: 16 tokens a step)
    assert res.ttft_s > 0 and sum(counts) - before >= 2
    h.cancel()
    # stop strings: the text ends before the stop; streamed pieces never show a part of it
    full = eng.generate(tok.encode("the king"), GREEDY)
    stop = full.text[4:7]
    pieces = []
    done = threading.Event()
    eng.submit(tok.encode("the king"), SamplingParams(max_tokens=12, stop=(stop, "@@@"),
                                                      ignore_eos=True),
               lambda ev: (pieces.append(ev), ev.finish_reason and done.set()))
    assert done.wait(30)
    text = "".join(p.text for p in pieces)
    assert text == full.text[:full.text.find(stop)] and pieces[-1].finish_reason == "stop"
    for _ in range(100):
      if eng.load()["active"] == 0:
        break
      time.sleep(0.05)
    assert eng.load()["active"] == 0 and eng.stats["cancelled"] == 1
    with pytest.raises(ValueError, match="exceed this server's 64"):
      eng.submit(tok.encode("x" * 60), SamplingParams(max_tokens=10), print)
    with pytest.raises(ValueError, match="temperature"):
      eng.submit([1], SamplingParams(temperature=-1), print)
  finally:
    eng.stop()


def test_queue_full_and_prefix_store_bound(run):
  eng = _engine(run, max_queue=2)            # not started: requests wait
  for _ in range(2):
    eng.submit([1, 2], GREEDY, lambda ev: None)
  with pytest.raises(engine_lib.QueueFull, match="2 requests are waiting for one of 4 slots"):
    eng.submit([1, 2], GREEDY, lambda ev: None)
  store = engine_lib.PrefixStore(max_bytes=3 * 100, page=4)
  store.page_bytes = 100
  store.add((1, 2, 3, 4, 5), ["p1", "p2"])
  store.add((1, 2, 3, 4, 5, 6, 7), ["p1", "p2"])       # the next turn replaces its older turn
  assert len(store.entries) == 1 and store.bytes == 200
  store.add((9, 9), ["q1"])
  store.add((8, 8), ["r1"])                            # over 300 bytes: the oldest goes
  assert [t for t, _ in store.entries.values()] == [(9, 9), (8, 8)] and store.bytes == 200
  first = list(store.entries)[0]
  assert store.lookup([9, 9, 3]) == (first, 2) and list(store.entries)[-1] == first   # used: newest
  assert store.lookup([9, 9])[1] == 1                  # the last prompt token always runs


def test_prefix_reuse_prefills_only_the_new_turn(run):
  eng = _engine(run).start()
  try:
    fmt = api.ChatFormat.for_run(run["exp"], run["tok"])
    msgs = [api.Message(role="user", content="hi")]
    six = SamplingParams(max_tokens=6, ignore_eos=True)
    p1 = fmt.prompt(msgs)
    r1 = eng.generate(p1, six)
    assert r1.prefilled == len(p1)
    msgs += [api.Message(role="assistant", content=r1.text), api.Message(role="user", content="more")]
    fmt.remember(r1.text, r1.tokens)     # the server's own reply: its exact ids come back
    p2 = fmt.prompt(msgs)
    cached = len(p1) + len(r1.tokens) - (r1.finish_reason == "length")   # the last one never fed
    assert p2[:cached] == (p1 + r1.tokens)[:cached]
    r2 = eng.generate(p2, six)
    assert r2.prefilled == len(p2) - cached                               # only the new text
    store, eng.store = eng.store, engine_lib.PrefixStore(0, eng.page)     # from scratch
    fresh = eng.generate(p2, six)
    eng.store = store
    assert fresh.prefilled == len(p2) and fresh.tokens == r2.tokens
  finally:
    eng.stop()


# ----------------------------------------------------------------------------- the HTTP API


def _direct(server, prompt_ids, max_tokens, stop=()):
  return server["engine"].generate(prompt_ids, SamplingParams(max_tokens=max_tokens, stop=stop))


def test_openai_client_completions_and_chat(run, server):
  client, tok = server["client"], run["tok"]
  assert [m.id for m in client.models.list()] == ["tiny"]
  want = _direct(server, tok.encode("the king"), 10)
  out = client.completions.create(model="tiny", prompt="the king", max_tokens=10, temperature=0)
  assert out.choices[0].text == want.text and out.choices[0].finish_reason == (
      "length" if want.finish_reason == "length" else "stop")
  assert out.usage.prompt_tokens == 8 and out.usage.completion_tokens == len(want.tokens)
  stream = client.completions.create(model="tiny", prompt="the king", max_tokens=10,
                                     temperature=0, stream=True)
  assert "".join(c.choices[0].text for c in stream) == want.text
  messages = [{"role": "system", "content": "Hi."}, {"role": "user", "content": "hello"}]
  fmt = api.ChatFormat.for_run(run["exp"], tok)
  want = _direct(server, fmt.prompt([api.Message(**m) for m in messages]), 6, tuple(fmt.stop()))
  out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                       temperature=0)
  assert out.choices[0].message.content == want.text and out.choices[0].message.role == "assistant"
  chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=6,
                                               temperature=0, stream=True,
                                               stream_options={"include_usage": True}))
  assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
  assert chunks[-1].usage.completion_tokens == len(want.tokens)
  # the next turn reuses the conversation's cache: only its new text is prefilled
  reused = server["engine"].stats["reused_tokens"]
  messages += [{"role": "assistant", "content": want.text}, {"role": "user", "content": "and?"}]
  client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, temperature=0)
  assert server["engine"].stats["reused_tokens"] - reused >= len(fmt.prompt(
      [api.Message(**m) for m in messages[:2]]))
  # sampling settings and the top_k extension go through
  a = client.completions.create(model="tiny", prompt="a", max_tokens=6, temperature=1.0,
                                top_p=0.9, seed=3, extra_body={"top_k": 30})
  b = client.completions.create(model="tiny", prompt="a", max_tokens=6, temperature=1.0,
                                top_p=0.9, seed=3, extra_body={"top_k": 30})
  assert a.choices[0].text == b.choices[0].text
  with pytest.raises(openai.AuthenticationError):
    openai.OpenAI(base_url=server["base"] + "/v1", api_key="wrong", max_retries=0).models.list()


def _post(base, path, body, key=KEY, headers=None):
  data = body if isinstance(body, bytes) else json.dumps(body).encode()
  hdrs = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {}),
          **(headers or {})}
  req = urllib.request.Request(base + path, data=data, headers=hdrs)
  try:
    with urllib.request.urlopen(req, timeout=60) as r:
      return r.status, json.loads(r.read()), r.headers
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read()), e.headers


def test_http_errors_busy_and_legacy_generate(run, server):
  base, eng = server["base"], server["engine"]
  req = urllib.request.Request(base + "/health", headers={"Authorization": f"Bearer {KEY}"})
  with urllib.request.urlopen(req, timeout=10) as r:
    health = json.loads(r.read())
  assert health["status"] == "ok" and health["step"] == 3 and health["max_len"] == 64
  assert _post(base, "/health", {}, key=None)[0] == 401          # every route wants the key
  cases = [
      ("/v1/completions", {"prompt": "a", "temperature": -1}, 422, "temperature: Input should be greater than or equal to 0"),
      ("/v1/completions", {"prompt": "a", "n": 2}, 422, "n: Input should be 1"),
      ("/v1/completions", {"prompt": "a", "bogus": 1}, 422, "bogus: Extra inputs are not permitted"),
      ("/v1/completions", {"max_tokens": 3}, 422, "prompt: Field required"),
      ("/v1/completions", {"prompt": "x" * 60, "max_tokens": 10}, 400, "60 tokens \\+ max_tokens 10 = 70 exceed this server's 64"),
      ("/v1/completions", {"prompt": ["a", "b"]}, 400, "send one prompt a request"),
      ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, 422, "messages.0.role"),
      ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "end with a 'user' message"),
      ("/v1/completions", {"prompt": "a", "stop": ["1", "2", "3", "4", "5"]}, 422, "at most 4"),
      ("/v1/completions", b"{not json", 422, "JSON decode error"),
      ("/nope", {}, 404, "routes: POST /v1/completions"),
  ]
  for path, body, code, message in cases:
    got, out, _ = _post(base, path, body)
    assert got == code, (path, body, got, out)
    assert __import__("re").search(message, out["error"]["message"]), (body, out)
  conn = http.client.HTTPConnection("127.0.0.1", int(base.rsplit(":", 1)[1]), timeout=30)
  conn.request("POST", "/v1/completions", headers={"Authorization": f"Bearer {KEY}",
                                                   "Content-Length": str(2 << 20)})
  resp = conn.getresponse()                   # answered before the body is sent
  assert resp.status == 413 and "at most 1048576" in json.loads(resp.read())["error"]["message"]
  conn.close()
  eng.max_queue = 0                           # a full queue: 503 with Retry-After
  try:
    got, out, headers = _post(base, "/v1/completions", {"prompt": "a"})
  finally:
    eng.max_queue = 8
  assert got == 503 and headers["Retry-After"] == "1" and "busy" in out["error"]["message"]
  # the former /generate API, unchanged for its users
  code, out, _ = _post(base, "/generate", {"prompt": "the king", "max_new_tokens": 6, "temperature": 0})
  want = eng.generate(run["tok"].encode("the king"), SamplingParams(max_tokens=6))
  assert code == 200 and out["tokens"][0] == want.tokens and out["completions"][0] == want.text
  code, out, _ = _post(base, "/generate", {"prompts": ["a", "hello there", ""], "seed": 1,
                                           "max_new_tokens": 5, "top_k": 20, "top_p": 0.9})
  assert code == 200 and len(out["completions"]) == 3 and len(out["finish_reasons"]) == 3
  for body, message in [(b"{not json", "not valid JSON"), ({"prompts": ["a"] * 5}, "at most 4 a request"),
                        ({"prompt": "a", "max_new_tokens": 0}, "out of range: use 1..63"),
                        ({"prompt": "a", "max_tokens": 5}, "unknown field"),
                        ({"prompt": "x" * 62, "max_new_tokens": 3}, "prompt 0: the prompt's 62 tokens")]:
    code, out, _ = _post(base, "/generate", body)
    assert code == 400 and message in out["error"], (body, out)


def test_client_disconnect_frees_the_slot(run, server, monkeypatch):
  eng = server["engine"]
  slow_decode = eng._decode
  monkeypatch.setattr(eng, "_decode", lambda: (time.sleep(0.05), slow_decode())[1])  # a big model
  port = int(server["base"].rsplit(":", 1)[1])
  for stream in (True, False):
    cancelled, rows = eng.stats["cancelled"], eng.stats["decode_rows"]
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    body = json.dumps({"prompt": "the", "max_tokens": 50, "stream": stream})
    conn.request("POST", "/v1/completions", body, {"Authorization": f"Bearer {KEY}",
                                                    "Content-Type": "application/json"})
    if stream:
      resp = conn.getresponse()
      assert resp.status == 200 and resp.readline().startswith(b"data: ")   # streaming
    else:
      for _ in range(100):                       # wait until it decodes, then hang up
        if eng.load()["active"]:
          break
        time.sleep(0.02)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    for _ in range(100):
      if eng.stats["cancelled"] > cancelled and eng.load()["active"] == 0:
        break
      time.sleep(0.05)
    assert eng.stats["cancelled"] == cancelled + 1 and eng.load()["active"] == 0, stream
    assert eng.stats["decode_rows"] - rows < 45                 # it stopped well before 50


# ----------------------------------------------------------------------------- the commands


def test_serve_command_and_start_without_tensorflow(run, monkeypatch, tmp_path):
  got = {}
  monkeypatch.setattr(api, "run", lambda app, host, port: got.update(app=app, host=host, port=port))
  assert cli.main(["serve", "--workdir", run["workdir"], "--slots", "4", "--port", "0",
                   "--api_key", "k"]) == 0
  assert got["host"] == "127.0.0.1" and {"/v1/completions", "/v1/chat/completions", "/generate"} <= {
      r.path for r in got["app"].routes}
  # sample, chat, serve, predict (of a prompted run) and load_pretrained import no TensorFlow
  # (one subprocess: this process has it loaded)
  sft = decoder_workdir(tmp_path / "sft", **{"TrainConfig.objective": "prompted_lm",
                                             "PromptedConfig.prompt_column": "prompt",
                                             "PromptedConfig.prompted_max_new_tokens": 2})
  (tmp_path / "in.jsonl").write_text('{"prompt": "hi"}\n')
  out = tmp_path / "out.jsonl"
  code = ("import sys; from bigmodel import cli, pretrained; from bigmodel.infer import api, engine, serve; "
          f"assert cli.main(['sample', '--workdir', {run['workdir']!r}, '--num_tokens', '2']) == 0; "
          f"assert cli.main(['predict', '--workdir', {sft!r}, '--input', {str(tmp_path / 'in.jsonl')!r}, "
          f"'--out', {str(out)!r}]) == 0; "
          f"assert pretrained.load_pretrained({run['workdir']!r}).family == 'gpt2'; "
          "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'")
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert [json.loads(x)["prompt"] for x in out.read_text().splitlines()] == ["hi"]
