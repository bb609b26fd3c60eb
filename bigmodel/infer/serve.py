"""`bigmodel serve`: the OpenAI-compatible API (bigmodel.infer.api) over the continuous-batching
engine (bigmodel.infer.engine), on uvicorn; and the former JSON route, kept for its users:

    POST /generate  {"prompt": "Once upon"}  or  {"prompts": ["a", "b"]}, and optionally
                    "max_new_tokens" (default 64), "temperature" (1.0; 0 is greedy),
                    "top_k" (0: off), "top_p" (1.0: off), "seed" (0)
      200 -> {"completions": [text, ..], "tokens": [[id, ..], ..], "finish_reasons": [..]}
             (the new text and ids of each prompt, in order; a reply ends at EOS or the limit)

A bad /generate request (invalid JSON, a missing or mistyped field, a value out of range, an
unknown field, too many prompts, a prompt plus max_new_tokens longer than the server's max_len)
gets 400 and {"error": "<what is wrong and how to fix it>"}. Its prompts now run through the
engine as separate requests, batched with everything else in flight.
"""

from __future__ import annotations

import json
import math
import os

from bigmodel.infer import decode

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


def json_object(body: bytes, example: str, fields) -> dict:
  """A request body as a JSON object with only the known `fields`, or a RequestError that
  shows `example`."""
  try:
    req = json.loads(body)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise RequestError(f"the body is not valid JSON ({e}); send an object like {example}") from None
  if not isinstance(req, dict):
    raise RequestError(f"the body must be a JSON object like {example}")
  unknown = sorted(set(req) - set(fields))
  if unknown:
    raise RequestError(f"unknown field(s) {unknown}; known: {list(fields)}")
  return req


def parse_generate(body: bytes, max_batch: int, limit: int) -> dict:
  """A /generate body -> {"prompts", "max_new_tokens", "temperature", "top_k", "top_p", "seed"}."""
  req = json_object(body, EXAMPLE, FIELDS)
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
    if len(prompts) > max_batch:
      raise RequestError(f'{len(prompts)} prompts: at most {max_batch} a request (split '
                         f'them, or start the server with a larger --max_batch)')
  out = {"prompts": prompts,
         "max_new_tokens": _int(req, "max_new_tokens", min(64, limit - 1), 1, limit - 1),
         "temperature": _number(req, "temperature", 1.0),
         "top_k": _int(req, "top_k", 0, 0, 2**31 - 1),
         "top_p": _number(req, "top_p", 1.0),
         "seed": _int(req, "seed", 0, 0, 2**32 - 1)}
  try:
    decode.check_sampling(out["temperature"], out["top_k"], out["top_p"])
  except ValueError as e:
    raise RequestError(str(e)) from None
  return out


def build_app(exp, model, params, tokenizer, *, step=None, slots: int = 8, max_len: int = 0,
              max_queue: int = 64, prefix_cache_mb: float = 256.0, template: str = "",
              model_name: str = "bigmodel", max_batch: int = 8, api_key: str | None = None):
  """(the FastAPI app, its engine, started and compiled) for a restored decoder run."""
  from bigmodel.infer import api, engine
  eng = engine.Engine(model, params, tokenizer, slots=slots, max_len=max_len or None,
                      max_queue=max_queue, prefix_cache_mb=prefix_cache_mb)
  eng.warmup()
  eng.start()
  service = api.Service(eng, tokenizer, api.ChatFormat.for_run(exp, tokenizer, template),
                        model_name=model_name, step=step, max_batch=max_batch)
  return api.make_app(service, api_key=api_key or os.environ.get("BIGMODEL_API_KEY") or None), eng
