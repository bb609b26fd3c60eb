"""An OpenAI-compatible HTTP API over the decode engine, on FastAPI (served by uvicorn).

    POST /v1/completions        {"prompt": "Once upon", "max_tokens": 32, "stream": true, ...}
    POST /v1/chat/completions   {"messages": [{"role": "user", "content": "Hi"}], ...}
    GET  /v1/models             the one model served
    GET  /health                status, checkpoint step, slots in use, requests waiting
    POST /generate              the former bigmodel JSON API (bigmodel.infer.serve documents it)

Both /v1 routes take `stream: true` and answer with server-sent events (`data: {...}` chunks,
then `data: [DONE]`), as OpenAI does, so the official `openai` client and the tools built on it
work unchanged. Supported fields: model (optional: any name answers with the served one),
max_tokens (chat: also max_completion_tokens), temperature, top_p, seed, stop (up to 4
strings), n = 1, stream, stream_options.include_usage, user; `top_k` as an extension (the openai
client sends it with `extra_body={"top_k": 40}`). OpenAI's defaults: temperature 1, top_p 1,
max_tokens 16 for completions; chat replies default to all the room left (at most 256 tokens).
logprobs, echo, n > 1 and penalties other than 0 are refused with a message, not ignored.

Chat prompts: the run's SFT template (PromptedConfig.prompt_template of a prompted-LM run; else
"User: {prompt}\\nAssistant:") on each user message, each assistant message followed by the
separator the run trained with (EOS; a newline for a plain LM), system messages first, one a
line, as `bigmodel chat` builds them. A reply also ends where the model starts the next user
turn (the template's text before {prompt}).

Errors, in OpenAI's shape {"error": {"message", "type", "param", "code"}}: 422 for a body that
does not match the schema (the message names each field and what to fix), 400 for a request
that cannot run (too long for the server's max_len, a character the tokenizer lacks), 401 for a
missing or wrong API key (checked on every route when one is set: `Authorization: Bearer KEY`),
411/413 for a body without a length or over the limit, 503 with Retry-After when the queue of
requests waiting for a slot is full. A client that disconnects frees its slot at once.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hmac
import json
import logging
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from bigmodel.infer import chat as chat_lib
from bigmodel.infer import engine as engine_lib
from bigmodel.infer import serve as legacy

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Limits:
  max_body_bytes: int = 1 << 20
  max_chars: int = 200_000          # one prompt or message
  max_messages: int = 512
  retry_after_s: int = 1
  chat_max_tokens: int = 256        # a chat reply's default max_tokens (capped by the room left)


# ----------------------------------------------------------------------------- request models


def _stop_field():
  return Field(None, description="up to 4 strings; the text ends before the first one")


class _Common(BaseModel):
  model_config = ConfigDict(extra="forbid")
  model: str | None = None
  temperature: float = Field(1.0, ge=0.0, le=100.0)
  top_p: float = Field(1.0, gt=0.0, le=1.0)
  top_k: int = Field(0, ge=0, description="extension: 0 is off")
  seed: int | None = Field(None, ge=0)
  stop: str | list[str] | None = _stop_field()
  stream: bool = False
  stream_options: dict[str, bool] | None = None
  n: Literal[1] = 1
  user: str | None = Field(None, max_length=256)
  presence_penalty: Literal[0] = 0
  frequency_penalty: Literal[0] = 0
  logprobs: Literal[False] | None = None


class CompletionRequest(_Common):
  prompt: str | list[str] = Field(..., description="a string (a list of exactly one)")
  max_tokens: int | None = Field(16, ge=1)
  echo: Literal[False] = False


class Message(BaseModel):
  model_config = ConfigDict(extra="forbid")
  role: Literal["system", "user", "assistant"]
  content: str
  name: str | None = None


class ChatRequest(_Common):
  messages: list[Message] = Field(..., min_length=1)
  max_tokens: int | None = Field(None, ge=1)
  max_completion_tokens: int | None = Field(None, ge=1)


class ApiError(Exception):
  def __init__(self, status: int, message: str, param: str | None = None,
               headers: dict | None = None):
    super().__init__(message)
    self.status, self.message, self.param, self.headers = status, message, param, headers


def _error(status: int, message: str, param: str | None = None, headers=None) -> JSONResponse:
  kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          422: "invalid_request_error", 503: "server_busy"}.get(status, "error")
  return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                      status_code=status, headers=headers)


# ----------------------------------------------------------------------------- prompts


@dataclasses.dataclass
class ChatFormat:
  """Messages -> prompt ids, as `bigmodel chat` builds a conversation (see the docstring)."""
  tokenizer: Any
  template: str
  separator: list[int]
  max_replies: int = 4096
  replies: collections.OrderedDict = dataclasses.field(default_factory=collections.OrderedDict)

  @classmethod
  def for_run(cls, exp, tokenizer, template: str = "") -> "ChatFormat":
    template, sft = chat_lib.resolve_template(exp, template)
    eos = getattr(tokenizer, "eos_id", None)
    sep = [eos] if sft and eos is not None else list(tokenizer.encode("\n"))
    return cls(tokenizer, template, sep)

  def _encode(self, text: str) -> list[int]:
    return list(self.tokenizer.encode(text)) if text else []

  def remember(self, text: str, ids: list[int]) -> None:
    """The exact ids of a reply this server wrote: when the client sends the reply back as
    the next turn's history, its ids (not a re-encoding, which need not give the same ids)
    go into the prompt, so the stored keys/values of the conversation match (prefix reuse)."""
    if text and self.tokenizer.decode(ids) == text:
      self.replies[text] = list(ids)
      self.replies.move_to_end(text)
      while len(self.replies) > self.max_replies:
        self.replies.popitem(last=False)

  def prompt(self, messages: list[Message]) -> list[int]:
    if messages[-1].role != "user":
      raise ApiError(400, f"the last message has role {messages[-1].role!r}: end with a 'user' "
                     f"message (the reply answers it)", "messages")
    system = "\n".join(m.content for m in messages if m.role == "system")
    ids = self._encode(system + "\n") if system else []
    for m in messages:
      if m.role == "user":
        ids += self._encode(self.template.replace("{prompt}", m.content))
      elif m.role == "assistant":
        known = self.replies.get(m.content)
        ids += (known if known is not None else self._encode(m.content)) + self.separator
    return ids

  def stop(self) -> list[str]:
    s = chat_lib.stop_text(self.template)
    return [s] if s else []


def _stops(stop, extra=()) -> tuple[str, ...]:
  stops = [stop] if isinstance(stop, str) else list(stop or [])
  if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
    raise ApiError(422, "stop: give at most 4 non-empty strings of at most 256 characters", "stop")
  return tuple(stops) + tuple(s for s in extra if s not in stops)


# ----------------------------------------------------------------------------- the service


class Service:
  """What the routes share: the engine, the tokenizer, the chat format and the limits."""

  def __init__(self, engine: engine_lib.Engine, tokenizer, chat_format: ChatFormat, *,
               model_name: str = "bigmodel", step: int | None = None, limits: Limits = Limits(),
               max_batch: int = 8):
    self.engine, self.tokenizer, self.chat = engine, tokenizer, chat_format
    self.model_name, self.step, self.limits, self.max_batch = model_name, step, limits, max_batch
    self.created = int(time.time())

  def encode(self, text: str, param: str) -> list[int]:
    if len(text) > self.limits.max_chars:
      raise ApiError(400, f"{param} has {len(text)} characters; at most {self.limits.max_chars}",
                     param)
    try:
      return list(self.tokenizer.encode(text))
    except ValueError as e:
      raise ApiError(400, f"{param} cannot be encoded: {e}", param) from None

  def params(self, req: _Common, prompt_len: int, max_tokens: int | None, default: int | None,
             stop_extra=()) -> engine_lib.SamplingParams:
    room = self.engine.max_len - prompt_len
    if room < 1:
      raise ApiError(400, f"the prompt has {prompt_len} tokens; this server holds at most "
                     f"{self.engine.max_len} (prompt + reply): shorten it", "prompt")
    n = max_tokens if max_tokens is not None else min(default or room, room)
    seed = req.seed if req.seed is not None else int.from_bytes(uuid.uuid4().bytes[:4], "little")
    return engine_lib.SamplingParams(max_tokens=n, temperature=req.temperature, top_k=req.top_k,
                                     top_p=req.top_p, seed=seed, stop=_stops(req.stop, stop_extra))

  def submit(self, prompt: list[int], params: engine_lib.SamplingParams):
    """(handle, asyncio queue of its events). 400 for a request that cannot run, 503 when full."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()
    try:
      handle = self.engine.submit(prompt, params,
                                  lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
    except engine_lib.QueueFull as e:
      raise ApiError(503, f"the server is busy ({e}); retry in {self.limits.retry_after_s} s",
                     headers={"Retry-After": str(self.limits.retry_after_s)}) from None
    except ValueError as e:
      raise ApiError(400, str(e)) from None
    return handle, queue

  def health(self) -> dict:
    cfg = self.engine.model.cfg
    return {"status": "ok", "model": self.model_name, "step": self.step,
            "vocab_size": cfg.vocab_size, "max_len": self.engine.max_len,
            "max_batch": self.max_batch, **self.engine.load()}


async def _events(request: Request | None, handle, queue: asyncio.Queue, poll_s: float = 0.25):
  """The request's events until it ends. With `request`, cancels it when the client goes away
  (checked every poll_s; a streaming response learns that from Starlette: see _Stream)."""
  checked = time.monotonic()
  while True:
    try:
      ev = await asyncio.wait_for(queue.get(), timeout=poll_s)
    except asyncio.TimeoutError:
      ev = None
    if request is not None and time.monotonic() - checked >= poll_s:
      checked = time.monotonic()
      if await request.is_disconnected():
        handle.cancel()
        return
    if ev is None:
      continue
    yield ev
    if ev.finish_reason:
      return


async def _collect(request: Request, handle, queue) -> tuple[str, list[int], str]:
  text, tokens, finish = [], [], "cancelled"
  try:
    async for ev in _events(request, handle, queue):
      if ev.error:
        raise ApiError(500, ev.error)
      text.append(ev.text)
      tokens += ev.tokens
      finish = ev.finish_reason or finish
  finally:
    handle.cancel()          # a no-op once it has ended
  return "".join(text), tokens, finish


class _Stream(StreamingResponse):
  """Server-sent events that cancel their request however the response ends."""

  def __init__(self, chunks, handle):
    super().__init__(chunks, media_type="text/event-stream",
                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    self.handle = handle

  async def __call__(self, scope, receive, send):
    try:
      await super().__call__(scope, receive, send)
    finally:
      self.handle.cancel()


def _sse(obj) -> str:
  return f"data: {json.dumps(obj)}\n\n"


def _usage(prompt_len: int, n: int) -> dict:
  return {"prompt_tokens": prompt_len, "completion_tokens": n, "total_tokens": prompt_len + n}


# ----------------------------------------------------------------------------- the app


def _finish(reason: str | None) -> str | None:
  return {"cancelled": None}.get(reason, reason)


async def _run(service: Service, request: Request, req: _Common, ids: list[int],
               params: engine_lib.SamplingParams, base: dict, choice, done=None):
  """The response of a /v1 request: `choice(text, finish)` makes one choice (a delta when
  streaming); done(text, tokens) once it has ended."""
  handle, queue = service.submit(ids, params)
  done = done or (lambda text, tokens: None)
  if not req.stream:
    text, tokens, finish = await _collect(request, handle, queue)
    done(text, tokens)
    return {**base, "choices": [choice(text, _finish(finish), False)],
            "usage": _usage(len(ids), len(tokens))}
  usage = bool((req.stream_options or {}).get("include_usage"))

  async def chunks():
    n, text, tokens = 0, [], []
    first = base["object"].startswith("chat")
    if first:
      yield _sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                       "finish_reason": None}]})
    async for ev in _events(None, handle, queue):
      n += len(ev.tokens)
      text.append(ev.text)
      tokens += ev.tokens
      if ev.error:
        yield _sse({"error": {"message": ev.error, "type": "server_error", "code": 500}})
        return
      if ev.finish_reason:
        done("".join(text), tokens)
      if ev.text or ev.finish_reason:
        yield _sse({**base, "choices": [choice(ev.text, _finish(ev.finish_reason), True)]})
    if usage:
      yield _sse({**base, "choices": [], "usage": _usage(len(ids), n)})
    yield "data: [DONE]\n\n"

  return _Stream(chunks(), handle)


def _completion_choice(text, finish, stream):
  return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}


def _chat_choice(text, finish, stream):
  if stream:
    return {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
  return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}


def make_app(service: Service, api_key: str | None = None) -> FastAPI:
  """The ASGI app; `api_key` (if set) is required on every route."""
  app = FastAPI(title="bigmodel", docs_url=None, redoc_url=None, openapi_url=None)
  app.add_middleware(_Guard, api_key=api_key, max_body=service.limits.max_body_bytes)
  _error_handlers(app)
  _openai_routes(app, service)
  _legacy_route(app, service)
  return app


def _error_handlers(app: FastAPI) -> None:
  @app.exception_handler(ApiError)
  async def _api_error(request, e: ApiError):
    return _error(e.status, e.message, e.param, e.headers)

  @app.exception_handler(RequestValidationError)
  async def _invalid(request, e: RequestValidationError):
    parts = []
    for err in e.errors():
      loc = ".".join(str(x) for x in err.get("loc", ()) if x != "body") or "body"
      parts.append(f"{loc}: {err.get('msg')}")
    return _error(422, "; ".join(parts[:8]) + " (fix these fields; see GET /v1/models for the "
                  "model, and the OpenAI API for the schema)", parts and parts[0].split(":")[0])

  from starlette.exceptions import HTTPException as StarletteHTTPException

  @app.exception_handler(StarletteHTTPException)
  async def _http(request, e):
    return _error(e.status_code, f"{request.method} {request.url.path}: {e.detail}; routes: "
                  f"POST /v1/completions, POST /v1/chat/completions, GET /v1/models, "
                  f"GET /health, POST /generate")



def _openai_routes(app: FastAPI, service: Service) -> None:
  @app.get("/health")
  async def health():
    return service.health()

  @app.get("/v1/models")
  async def models():
    return {"object": "list", "data": [{"id": service.model_name, "object": "model",
                                        "created": service.created, "owned_by": "bigmodel"}]}

  @app.post("/v1/completions")
  async def completions(req: CompletionRequest, request: Request):
    prompts = [req.prompt] if isinstance(req.prompt, str) else req.prompt
    if len(prompts) != 1:
      raise ApiError(400, f"prompt: a list of {len(prompts)} prompts; send one prompt a "
                     f"request (requests are batched on the server)", "prompt")
    ids = service.encode(prompts[0], "prompt") or [service.engine.eos_id or 0]
    params = service.params(req, len(ids), req.max_tokens, 16)
    base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": service.model_name}
    return await _run(service, request, req, ids, params, base, _completion_choice)

  @app.post("/v1/chat/completions")
  async def chat_completions(req: ChatRequest, request: Request):
    if len(req.messages) > service.limits.max_messages:
      raise ApiError(400, f"{len(req.messages)} messages; at most {service.limits.max_messages}",
                     "messages")
    for i, m in enumerate(req.messages):
      if len(m.content) > service.limits.max_chars:
        raise ApiError(400, f"messages.{i}.content has {len(m.content)} characters; at most "
                       f"{service.limits.max_chars}", "messages")
    try:
      ids = service.chat.prompt(req.messages)
    except ValueError as e:
      raise ApiError(400, f"messages cannot be encoded: {e}", "messages") from None
    max_tokens = req.max_completion_tokens or req.max_tokens
    params = service.params(req, len(ids), max_tokens, service.limits.chat_max_tokens,
                            service.chat.stop())
    base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
            "created": int(time.time()), "model": service.model_name}
    if req.stream:
      base["object"] = "chat.completion.chunk"
    return await _run(service, request, req, ids, params, base, _chat_choice, service.chat.remember)


def _legacy_route(app: FastAPI, service: Service) -> None:
  @app.post("/generate")
  async def generate(request: Request):
    try:
      job = legacy.parse_generate(await request.body(), service.max_batch, service.engine.max_len)
      prompts = []
      for i, p in enumerate(job["prompts"]):
        try:
          prompts.append(list(service.tokenizer.encode(p)) if p else [service.engine.eos_id or 0])
        except ValueError as e:
          raise legacy.RequestError(f"prompt {i} cannot be encoded: {e}") from None
      params = engine_lib.SamplingParams(
          max_tokens=job["max_new_tokens"], temperature=job["temperature"], top_k=job["top_k"],
          top_p=job["top_p"], seed=job["seed"])
      for i, p in enumerate(prompts):
        try:
          service.engine.check(p, params)
        except ValueError as e:
          raise legacy.RequestError(f"prompt {i}: {e}") from None
    except legacy.RequestError as e:
      return JSONResponse({"error": str(e)}, status_code=400)
    jobs = [service.submit(p, params) for p in prompts]
    outs = await asyncio.gather(*(_collect(request, h, q) for h, q in jobs))
    return {"completions": [t for t, _, _ in outs], "tokens": [k for _, k, _ in outs],
            "finish_reasons": [{"stop": "eos"}.get(f, f) for _, _, f in outs]}


# ----------------------------------------------------------------------------- recommender
# `bigmodel serve` on a sasrec / bert4rec run: POST /recommend (bigmodel.infer.recommend).


def make_recommend_app(recommender, *, max_batch: int = 8, api_key: str | None = None,
                       model_name: str = "bigmodel", max_body: int = 1 << 20) -> FastAPI:
  """The ASGI app of a recommender: POST /recommend, GET /health; errors as /generate's."""
  from starlette.exceptions import HTTPException as StarletteHTTPException
  from bigmodel.infer import recommend
  app = FastAPI(title="bigmodel", docs_url=None, redoc_url=None, openapi_url=None)
  app.add_middleware(_Guard, api_key=api_key, max_body=max_body)

  @app.exception_handler(StarletteHTTPException)
  async def _http(request, e):
    return _error(e.status_code, f"{request.method} {request.url.path}: {e.detail}; routes: "
                  f"POST /recommend, GET /health")

  @app.get("/health")
  async def health():
    return {"status": "ok", "model": model_name, "step": recommender.step,
            "items": len(recommender.vocab)}

  @app.post("/recommend")
  async def recommend_route(request: Request):
    try:
      job = recommend.parse_recommend(await request.body(), max_batch, len(recommender.vocab),
                                      recommender.rc.top_k)
    except legacy.RequestError as e:
      return JSONResponse({"error": str(e)}, status_code=400)
    answers = await asyncio.to_thread(
        lambda: [recommender.recommend(h, job["top_k"]) for h in job["histories"]])
    return {"recommendations": answers}

  return app


class _Guard:
  """ASGI middleware: the API key on every route, a length on every body, a size limit."""

  def __init__(self, app, api_key: str | None, max_body: int):
    self.app, self.max_body = app, max_body
    self.want = f"Bearer {api_key}".encode() if api_key else None

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    headers = dict(scope["headers"])
    err = None
    if self.want is not None and not hmac.compare_digest(headers.get(b"authorization", b""),
                                                         self.want):
      err = _error(401, "a missing or wrong API key: send the header 'Authorization: Bearer "
                   "KEY' (the openai client: api_key=KEY)")
    elif scope["method"] == "POST":
      length = headers.get(b"content-length")
      if length is None or not length.isdigit():
        err = _error(411, "send the body with a Content-Length header")
      elif int(length) > self.max_body:
        err = _error(413, f"the body is {int(length)} bytes; at most {self.max_body}")
    if err is not None:
      return await err(scope, receive, send)
    return await self.app(scope, receive, send)


def run(app: FastAPI, host: str, port: int, log_level: str = "warning") -> None:
  """Serves until interrupted (uvicorn)."""
  import uvicorn
  uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
