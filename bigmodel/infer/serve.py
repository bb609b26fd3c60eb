"""`bigmodel serve`: generation over HTTP with JSON, on the standard library alone.

    POST /generate  {"prompt": "Once upon"}  or  {"prompts": ["a", "b"]}, and optionally
                    "max_new_tokens" (default 64), "temperature" (1.0; 0 is greedy),
                    "top_k" (0: off), "top_p" (1.0: off), "seed" (0)
      200 -> {"completions": [text, ..], "tokens": [[id, ..], ..], "finish_reasons": [..]}
             (the new text and ids of each prompt, in order; a reply ends at EOS or the limit)
    GET /health -> 200 {"status": "ok", "step", "vocab_size", "max_len", "max_batch"}

A bad request (invalid JSON, a missing or mistyped field, a value out of range, an unknown
field, too many prompts, a prompt plus max_new_tokens longer than ModelConfig.max_len) gets 400
and {"error": "<what is wrong and how to fix it>"}; an unknown path 404. The server keeps
running either way.

Threads: ThreadingHTTPServer parses requests concurrently; one lock around the model lets one
batch decode at a time (requests are not batched together). A request's prompts decode as one
batch, padded to a power of two so that few shapes compile.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from bigmodel.config import ConfigError
from bigmodel.infer import decode, sample

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20
EXAMPLE = '{"prompt": "Hello", "max_new_tokens": 32, "temperature": 0.8, "top_p": 0.95}'
FIELDS = ("prompt", "prompts", "max_new_tokens", "temperature", "top_k", "top_p", "seed")


class RequestError(ValueError):
  """A client mistake: answered with 400 and this message."""


def _int(req: dict, name: str, default: int, lo: int, hi: int) -> int:
  v = req.get(name, default)
  if isinstance(v, bool) or not isinstance(v, int):
    raise RequestError(f'"{name}" must be an integer, got {json.dumps(v)}')
  if not lo <= v <= hi:
    raise RequestError(f'"{name}"={v} is out of range: use {lo}..{hi}')
  return v


def _number(req: dict, name: str, default: float) -> float:
  v = req.get(name, default)
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
    raise RequestError(f'"{name}" must be a number, got {json.dumps(v)}')
  return float(v)


class Service:
  """Validates requests and runs them through one Generator, one batch at a time."""

  def __init__(self, model, params, tokenizer, *, step: int | None = None, max_batch: int = 8,
               default_max_new_tokens: int = 64):
    self.tokenizer = tokenizer
    self.cfg = model.cfg
    self.gen = decode.Generator(model, params, bucket=32)
    self.limit = self.cfg.max_len       # RoPE has no table, but the cache still has to fit
    self.step, self.max_batch = step, max_batch
    self.default_new = min(default_max_new_tokens, self.limit - 1)
    self.lock = threading.Lock()

  def health(self) -> dict:
    return {"status": "ok", "step": self.step, "vocab_size": self.cfg.vocab_size,
            "max_len": self.limit, "max_batch": self.max_batch}

  def parse(self, body: bytes) -> dict:
    try:
      req = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise RequestError(f"the body is not valid JSON ({e}); send an object like {EXAMPLE}") from None
    if not isinstance(req, dict):
      raise RequestError(f"the body must be a JSON object like {EXAMPLE}")
    unknown = sorted(set(req) - set(FIELDS))
    if unknown:
      raise RequestError(f"unknown field(s) {unknown}; known: {list(FIELDS)}")
    if ("prompt" in req) == ("prompts" in req):
      raise RequestError(f'give exactly one of "prompt" (a string) or "prompts" (a list of '
                         f'strings), e.g. {EXAMPLE}')
    if "prompt" in req:
      if not isinstance(req["prompt"], str):
        raise RequestError(f'"prompt" must be a string, got {json.dumps(req["prompt"])}')
      prompts = [req["prompt"]]
    else:
      prompts = req["prompts"]
      if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise RequestError('"prompts" must be a non-empty list of strings')
      if len(prompts) > self.max_batch:
        raise RequestError(f'{len(prompts)} prompts: at most {self.max_batch} a request (split '
                           f'them, or start the server with a larger --max_batch)')
    out = {"prompts": prompts,
           "max_new_tokens": _int(req, "max_new_tokens", self.default_new, 1, self.limit - 1),
           "temperature": _number(req, "temperature", 1.0),
           "top_k": _int(req, "top_k", 0, 0, 2**31 - 1),
           "top_p": _number(req, "top_p", 1.0),
           "seed": _int(req, "seed", 0, 0, 2**32 - 1)}
    try:
      decode.check_sampling(out["temperature"], out["top_k"], out["top_p"])
    except ValueError as e:
      raise RequestError(str(e)) from None
    return out

  def generate(self, body: bytes) -> dict:
    req = self.parse(body)
    ids, strip = [], []
    for i, p in enumerate(req["prompts"]):
      try:
        tokens, start = sample.prompt_ids(self.tokenizer, p)
        self.gen.check_length(len(tokens), req["max_new_tokens"], self.limit)
      except ConfigError as e:
        raise RequestError(f"prompt {i}: {e}") from None
      except ValueError as e:
        raise RequestError(f"prompt {i} cannot be encoded: {e}") from None
      ids.append(tokens)
      strip.append(start)
    batch = 1 << (len(ids) - 1).bit_length()
    with self.lock:
      res = self.gen(ids, req["max_new_tokens"], temperature=req["temperature"], top_k=req["top_k"],
                     top_p=req["top_p"], seed=req["seed"], eos_id=self.tokenizer.eos_id,
                     max_len=self.limit, batch_multiple=batch)
    return {"completions": [self.tokenizer.decode(r.tokens) for r in res],
            "tokens": [r.tokens for r in res], "finish_reasons": [r.finish for r in res]}


def make_server(service: Service, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
  """A server bound to (host, port) (port 0: any free port; see `server.server_address`)."""

  class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _reply(self, code: int, obj: Any) -> None:
      data = json.dumps(obj).encode()
      self.send_response(code)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def do_GET(self):
      if self.path == "/health":
        self._reply(200, service.health())
      else:
        self._reply(404, {"error": f"no such path {self.path}: GET /health or POST /generate"})

    def do_POST(self):
      if self.path != "/generate":
        self._reply(404, {"error": f"no such path {self.path}: POST /generate"})
        return
      try:
        length = int(self.headers.get("Content-Length", ""))
      except ValueError:
        self.close_connection = True
        self._reply(400, {"error": "send a Content-Length header with the JSON body"})
        return
      if length > MAX_BODY:
        self.close_connection = True
        self._reply(413, {"error": f"the body is {length} bytes; at most {MAX_BODY}"})
        return
      body = self.rfile.read(length)
      try:
        self._reply(200, service.generate(body))
      except RequestError as e:
        self._reply(400, {"error": str(e)})
      except Exception as e:  # noqa: BLE001 - a failed request must not end the server
        log.exception("POST /generate failed")
        self._reply(500, {"error": f"internal error: {type(e).__name__}: {e}"})

    def log_message(self, fmt, *args):
      log.info("%s %s", self.address_string(), fmt % args)

  return ThreadingHTTPServer((host, port), Handler)


def serve(service: Service, host: str, port: int) -> None:
  server = make_server(service, host, port)
  h, p = server.server_address[:2]
  print(f"bigmodel serve: listening on http://{h}:{p} (POST /generate, GET /health)", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
