"""A decode engine with continuous batching: many requests share one KV cache, one step at a time.

    engine = Engine(model, params, tokenizer, slots=8, max_len=512)
    engine.start()                                     # the engine's own thread
    res = engine.generate(prompt_ids, SamplingParams(max_tokens=64, temperature=0.0))
    res.text, res.tokens, res.finish_reason            # blocking; or, streaming:
    handle = engine.submit(prompt_ids, params, on_event)   # on_event(Event) from the engine thread
    handle.cancel()                                    # frees the slot at the next step

The design of vLLM, TGI and JetStream, on one host:
  * `slots` rows share one cache of `max_len` positions a row (rounded up to whole pages).
    Every engine step runs one jitted decode call over all slots; an idle or prefilling slot
    rides along with segment id 0, so its cache index does not move (models/decoder.py).
    While no request waits (none queued, no prompt left to prefill), the last step freed no
    slot (a client that got its answer often sends the next request at once) and every
    decoding row wants at least `decode_steps` more tokens, the call runs that many steps (a
    scan: vLLM's multi-step scheduling), so the host's dispatch, the wait for the ids and the
    Python between steps come once per `decode_steps` tokens; a row that ends inside the call
    (EOS, a stop string) keeps its tokens up to its end, the rest are dropped. Else the call
    runs one step, so that a new request joins at once.
  * A new request takes a free slot and is prefilled in chunks (the smallest of `chunk_sizes`
    that holds the rest of the prompt, else the largest). Prefill goes first: each engine step
    runs the waiting prompts' chunks, oldest first, several slots' chunks of one size in one
    call (`prefill_rows` of them: one weight pass for all), before its decode step, until none
    is left or, while other requests decode, `prefill_budget` prompt tokens have run (so a long
    prompt delays the decoding requests by about that much a step). Requests that arrive during
    a prefill call are admitted before the next one, so they join this step's prefill instead of
    waiting for its decode call. The last chunk samples the request's first token (sent at once);
    the request joins the batch at the next decode step. A burst of arrivals thus gets its first
    tokens without waiting for decode steps in between.
  * A request that ends (EOS, a stop string, max_tokens, or cancel) frees its slot at once.
  * Sampling parameters (temperature, top-k, top-p, seed) are per-slot arrays inside the step:
    row i draws with fold_in(key(seed_i), n) for its n-th token, so a request gives the same
    tokens alone or in any batch. Greedy rows only take an argmax; the sort over the vocabulary
    runs only when a sampled row asks for top-p or a top-k over 256 (pure top-k: lax.top_k).
  * A decode call's attention reads only the first `span` cache slots, the smallest of the
    cache length, its half, its quarter ... (`decode_spans` of them) that holds every decoding
    row's keys through the call's last step, instead of the whole row (ModelConfig.decode_span).
  * Shapes are static: one compile of each decode call (1 and `decode_steps` steps, each span),
    one of each (prefill rows, chunk size) and one of the page copies, all made by `warmup()`;
    nothing compiles while serving.
  * Prefix reuse: a finished request's keys and values (its prompt and reply) go into an LRU
    store of pages (`page` positions each, bounded by `prefix_cache_mb`). A new request whose
    tokens start with a stored sequence gets those pages copied into its slot and prefills
    only the rest: the next chat turn prefills only its new text.

The cache index of a prefilling slot is set by each chunk (`pos`), so a slot's leftovers never
matter: positions past a row's index are masked and then overwritten.

Scope: one device (the params are gathered to it; serving a mesh-sharded model is not done
here). The engine holds the unrolled twin of a scanned decoder (`decode.unstack_layers`).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import threading
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bigmodel.config import ConfigError
from bigmodel.infer import decode

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
  """More requests are waiting than the engine's `max_queue`: try again later (HTTP 503)."""


# ----------------------------------------------------------------------------- requests


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  max_tokens: int = 16
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int = 0
  stop: tuple[str, ...] = ()
  ignore_eos: bool = False

  def check(self) -> None:
    decode.check_sampling(self.temperature, self.top_k, self.top_p)
    if self.max_tokens < 1:
      raise ValueError(f"max_tokens={self.max_tokens}: ask for at least 1 token")
    if any(not s for s in self.stop):
      raise ValueError("an empty stop string would stop at once: give non-empty strings")


@dataclasses.dataclass
class Event:
  """What a request got from one engine step: new text (held back while it may be the start of
  a stop string), the new token ids, and finish_reason once it has ended ("stop": EOS or a stop
  string, "length": max_tokens, "cancelled", "error")."""
  text: str = ""
  tokens: list[int] = dataclasses.field(default_factory=list)
  finish_reason: str | None = None
  error: str | None = None


@dataclasses.dataclass
class Result:
  text: str
  tokens: list[int]
  finish_reason: str
  prompt_tokens: int
  prefilled: int            # prompt tokens run through the model (the rest came from the store)
  ttft_s: float             # submit -> first token
  ttft_calls: tuple[int, int] | None = None   # (decode steps, prefill calls) in that time


class Handle:
  """A submitted request: `cancel()` frees its slot (or drops it from the queue)."""

  def __init__(self, engine: "Engine", rid: int, prompt: list[int], params: SamplingParams,
               on_event: Callable[[Event], None]):
    self.engine, self.id, self.prompt, self.params = engine, rid, prompt, params
    self.on_event = on_event
    self.cancelled = False
    self.submitted = time.perf_counter()
    self.first_token_at: float | None = None
    self.prefilled = 0
    self.clock0 = engine.clock()                 # (decode steps, prefill calls) at submit
    self.ttft_calls: tuple[int, int] | None = None   # ... that ran before its first token

  def cancel(self) -> None:
    self.cancelled = True
    self.engine._wake()


class _Slot:
  """Host state of a request in a slot."""

  def __init__(self, handle: Handle, start: int):
    self.handle = handle
    self.pos = start                 # prompt tokens already in the cache
    self.decoding = False
    self.generated: list[int] = []   # sampled ids (an EOS is not kept)
    self.sent = 0                    # characters of the text already emitted
    self.fed = start                 # tokens whose keys/values are in the cache


# ----------------------------------------------------------------------------- jitted steps


TOP_K_CAP = 256    # pure top-k rows up to this k filter with lax.top_k instead of a full sort


def _filter_rows(scaled, top_k, top_p):
  """Each row's top-k / top-p filter (rows with neither keep their logits). The full sort over
  the vocabulary runs only when a row asks for top-p or a top-k over TOP_K_CAP; rows of pure
  top-k (k <= TOP_K_CAP) need only the k largest values (lax.top_k): the same threshold, so
  the same kept set as decode.filter_logits."""
  need = (top_k > 0) | (top_p < 1.0)

  def small_k(x):
    v = x.shape[-1]
    k = jnp.minimum(top_k, min(TOP_K_CAP, v))
    top = jax.lax.top_k(x, min(TOP_K_CAP, v))[0]                      # b cap, most likely first
    threshold = jnp.take_along_axis(top, jnp.maximum(k - 1, 0)[:, None], axis=-1)
    return jnp.where(need[:, None], jnp.where(x >= threshold, x, -jnp.inf), x)

  def full(x):
    return jnp.where(need[:, None], decode.filter_logits(x, top_k[:, None], top_p[:, None]), x)

  fast = jnp.all(~need | ((top_p >= 1.0) & (top_k <= TOP_K_CAP)))
  return jax.lax.cond(jnp.any(need),
                      lambda x: jax.lax.cond(fast, small_k, full, x), lambda x: x, scaled)


def sample_rows(logits, seeds, steps, temperature, top_k, top_p):
  """logits [b, v] -> ids [b] with per-row settings ([b] arrays); see the module docstring.
  Only greedy rows: an argmax. Sampled rows without top-k / top-p: no sort (`_filter_rows`)."""
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  sampled = temperature > 0

  def draw(_):
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    scaled = _filter_rows(scaled, jnp.where(sampled, top_k, 0), jnp.where(sampled, top_p, 1.0))
    keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(seeds, steps)
    return jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)

  drawn = jax.lax.cond(jnp.any(sampled), draw, lambda _: greedy, None)
  return jnp.where(sampled, drawn, greedy)


def _is_index(path) -> bool:
  return getattr(path[-1], "key", None) == "index"


def _lm_head(model, params, hidden):
  """hidden [b, d] -> float32 logits [b, v], as the Decoder's own head computes them."""
  dt = hidden.dtype
  if model.cfg.tie_embeddings:
    return jnp.einsum("bd,vd->bv", hidden, params["embed"]["embedding"].astype(dt)).astype(jnp.float32)
  return jnp.einsum("bd,dv->bv", hidden, params["lm_head"].astype(dt)).astype(jnp.float32)


def _decode_step(model, params, cache, tokens, active, temperature, top_k, top_p, seeds, steps):
  logits, state = model.apply({"params": params, "cache": cache}, tokens[:, None],
                              segment_ids=active[:, None].astype(jnp.int32), decode=True,
                              mutable=["cache"])
  return state["cache"], sample_rows(logits[:, 0], seeds, steps, temperature, top_k, top_p)


def _decode_steps(model, params, cache, tokens, active, temperature, top_k, top_p, seeds, steps,
                  *, k: int):
  """k decode steps in one call (a scan; each feeds the last sampled ids): ids [k, b]. Rows run
  all k steps; the host keeps each request's tokens up to its end (EOS, stop, max_tokens) and
  drops the rest: a row's extra keys/values lie past its end, where nothing reads them."""
  if k == 1:
    cache, tok = _decode_step(model, params, cache, tokens, active, temperature, top_k, top_p,
                              seeds, steps)
    return cache, tok[None]

  def body(carry, j):
    cache, tok = carry
    cache, tok = _decode_step(model, params, cache, tok, active, temperature, top_k, top_p, seeds,
                              steps + j)
    return (cache, tok), tok
  (cache, _), toks = jax.lax.scan(body, (cache, tokens), jnp.arange(k, dtype=steps.dtype))
  return cache, toks


def _prefill_rows(model, params, cache, slots, tokens, n_valid, pos, temperature, top_k, top_p,
                  seeds):
  """Runs tokens [k, c] (the first n_valid[r] of row r real) at positions pos[r].. of cache rows
  slots[k] (distinct) in one call; samples each row's token after its last real one (used only
  by a prompt's last chunk)."""
  rows = jax.tree_util.tree_map_with_path(
      lambda p, a: pos.astype(a.dtype) if _is_index(p) else jnp.take(a, slots, axis=0), cache)
  valid = (jnp.arange(tokens.shape[1])[None, :] < n_valid[:, None]).astype(jnp.int32)
  hidden, state = model.apply({"params": params, "cache": rows}, tokens, segment_ids=valid,
                              decode=True, return_hidden=True, mutable=["cache"])
  cache = jax.tree.map(lambda a, r: a.at[slots].set(r), cache, state["cache"])
  logits = _lm_head(model, params, hidden[jnp.arange(tokens.shape[0]), n_valid - 1])
  tok = sample_rows(logits, seeds, jnp.zeros_like(n_valid), temperature, top_k, top_p)
  return cache, tok


def _read_page(cache, slot, offset, *, size):
  """The keys and values of positions offset .. offset + size - 1 of one slot (index left out)."""
  out = []
  for path, a in jax.tree_util.tree_leaves_with_path(cache):
    if not _is_index(path):
      start = (slot, offset) + (0,) * (a.ndim - 2)
      out.append(jax.lax.dynamic_slice(a, start, (1, size) + a.shape[2:]))
  return out


def _write_page(cache, slot, offset, page):
  """Writes a page at `offset` of `slot` and moves the slot's index to the page's end, so that
  the decode steps before its prefill (segment 0: they write at the index) spare the page."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(cache)
  it = iter(page)
  new = []
  for path, a in leaves:
    if _is_index(path):
      new.append(a.at[slot].set(offset + page[0].shape[1]))
    else:
      new.append(jax.lax.dynamic_update_slice(a, next(it), (slot, offset) + (0,) * (a.ndim - 2)))
  return jax.tree_util.tree_unflatten(tree, new)


_decode_jit = jax.jit(_decode_steps, static_argnums=0, static_argnames="k", donate_argnums=2)
_prefill_jit = jax.jit(_prefill_rows, static_argnums=0, donate_argnums=2)
_read_page_jit = jax.jit(_read_page, static_argnames="size")
_write_page_jit = jax.jit(_write_page, donate_argnums=0)


def compile_counts() -> dict[str, int]:
  """How many programs each of the engine's jitted functions holds (a test checks that serving
  adds none after `warmup`)."""
  return {"decode": _decode_jit._cache_size(), "prefill": _prefill_jit._cache_size(),
          "read_page": _read_page_jit._cache_size(), "write_page": _write_page_jit._cache_size()}


# ----------------------------------------------------------------------------- prefix store


class PrefixStore:
  """LRU of (token ids, their keys/values as pages), bounded by bytes."""

  def __init__(self, max_bytes: int, page: int):
    self.max_bytes, self.page = max_bytes, page
    self.entries: collections.OrderedDict[int, tuple[tuple[int, ...], list]] = collections.OrderedDict()
    self.bytes = 0
    self._ids = itertools.count()
    self.page_bytes = 0

  def lookup(self, prompt: Sequence[int]) -> tuple[int | None, int]:
    """(entry key, how many leading prompt tokens it holds); at most len(prompt) - 1, so that
    the last prompt token is always run (its logits give the first new token)."""
    best, best_n = None, 0
    limit = len(prompt) - 1
    for key, (tokens, _) in self.entries.items():
      n = 0
      for a, b in zip(tokens[:limit], prompt):
        if a != b:
          break
        n += 1
      if n > best_n:
        best, best_n = key, n
    if best is not None:
      self.entries.move_to_end(best)
    return best, best_n

  def pages(self, key: int) -> list:
    return self.entries[key][1]

  def add(self, tokens: tuple[int, ...], pages: list) -> None:
    for key, (old, _) in list(self.entries.items()):   # an older turn of the same conversation
      if len(old) <= len(tokens) and tokens[:len(old)] == old:
        self._drop(key)
    size = len(pages) * self.page_bytes
    if size > self.max_bytes:
      return
    while self.bytes + size > self.max_bytes and self.entries:
      self._drop(next(iter(self.entries)))
    self.entries[next(self._ids)] = (tokens, pages)
    self.bytes += size

  def _drop(self, key: int) -> None:
    _, pages = self.entries.pop(key)
    self.bytes -= len(pages) * self.page_bytes


# ----------------------------------------------------------------------------- the engine


def _stop_holdback(text: str, stops: Sequence[str]) -> int:
  """How many trailing characters could be the start of a stop string (or an unfinished
  multi-byte character, which decodes as U+FFFD): held back until the next token."""
  hold = 0
  for s in stops:
    for n in range(min(len(s) - 1, len(text)), 0, -1):
      if text.endswith(s[:n]):
        hold = max(hold, n)
        break
  if text.endswith("\ufffd"):
    hold = max(hold, 1)
  return hold


class Engine:
  """Continuous batching over `slots` rows of one KV cache; see the module docstring.

  model, params: a Decoder and its params (any mesh; the engine runs on one device).
  tokenizer: for text events and stop strings (None: token ids only).
  max_len: the most tokens (prompt + new) a request may hold (default and upper bound with
  learned positions: ModelConfig.max_len). chunk_sizes: prefill chunk lengths. prefill_rows:
  how many slots' chunks one prefill call may run (1 is always one; each (rows, chunk size)
  compiles once). prefill_budget: prompt tokens an engine step prefills, at least one call,
  while other requests decode (all waiting prompts when none does). max_queue: requests
  waiting for a slot before `submit` raises QueueFull. decode_steps: decode steps a call while
  nothing waits (1: one a call). decode_spans: how many attention spans the decode calls are
  compiled for (1: the whole cache row only)."""

  def __init__(self, model, params, tokenizer=None, *, slots: int = 8, max_len: int | None = None,
               chunk_sizes: Sequence[int] = (16, 64), prefill_rows: Sequence[int] = (1, 2, 4),
               prefill_budget: int = 256, page: int = 64, max_queue: int = 64,
               prefix_cache_mb: float = 256.0, eos_id: int | None = None, decode_steps: int = 4,
               decode_spans: int = 3):
    cfg = model.cfg
    limit = decode.position_limit(cfg)
    max_len = max_len or cfg.max_len
    if limit is not None and max_len > limit:
      raise ConfigError(f"max_len={max_len} exceeds the model's {limit} positions "
                        f"(ModelConfig.max_len): use at most {limit}")
    if slots < 1 or not chunk_sizes or min(chunk_sizes) < 1 or page < 1 or prefill_budget < 1 \
        or min(prefill_rows, default=1) < 1 or decode_steps < 1 or decode_spans < 1:
      raise ConfigError(f"slots={slots}, chunk_sizes={tuple(chunk_sizes)}, prefill_rows="
                        f"{tuple(prefill_rows)}, prefill_budget={prefill_budget}, page={page}, "
                        f"decode_steps={decode_steps}, decode_spans={decode_spans}: each must be "
                        f"at least 1")
    model, params = decode.unstack_layers(model.clone(mesh=None), nn.meta.unbox(params))
    self.model = model
    self.params = jax.device_put(jax.device_get(params))
    self.tokenizer = tokenizer
    self.eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eos_id", None)
    self.slots, self.max_len = slots, max_len
    self.chunk_sizes = tuple(sorted(set(int(c) for c in chunk_sizes)))
    self.prefill_rows = tuple(sorted({1} | {int(r) for r in prefill_rows if r <= slots}))
    self.prefill_budget = prefill_budget
    self.page = page
    self.decode_steps = decode_steps
    # no slack past max_len (each decode step attends over the whole row): the keys and values
    # of a last chunk's padding, or of the extra steps of a row that ended inside a call, fall
    # past the end and are dropped (layers.write_rows); pages are read whole.
    self.cache_len = -(-max_len // page) * page
    self.cache = nn.meta.unbox(decode.init_cache(model, slots, self.cache_len))
    # decode calls attend to the first `span` cache slots, the smallest that holds every row:
    # the cache length, its half, its quarter ... (decode_spans of them, whole pages)
    # (i = 0 gives the cache length itself: that span is the model as it is)
    self.spans = tuple(sorted({max(-(-self.cache_len // 2**i // page) * page, page)
                               for i in range(decode_spans)}))
    self._span_models = {n: model if n == self.cache_len else
                         model.clone(cfg=dataclasses.replace(model.cfg, decode_span=n))
                         for n in self.spans}
    self.store = PrefixStore(int(prefix_cache_mb * 2**20), page)
    kv = [a for p, a in jax.tree_util.tree_leaves_with_path(self.cache) if not _is_index(p)]
    self.store.page_bytes = sum(a.dtype.itemsize * a[0, :page].size for a in kv)
    self.max_queue = max_queue
    self.stats = collections.Counter()
    self.first_tokens: collections.deque[tuple[int, int]] = collections.deque(maxlen=100_000)
    self._active: list[_Slot | None] = [None] * slots
    self._waiting: collections.deque[Handle] = collections.deque()
    self._cond = threading.Condition()
    self._ids = itertools.count()
    self._thread: threading.Thread | None = None
    self._stopping = False
    self._freed = False
    s = slots
    self._tok = np.zeros(s, np.int32)
    self._temp, self._top_p = np.zeros(s, np.float32), np.ones(s, np.float32)
    self._top_k, self._seed, self._step = np.zeros(s, np.int32), np.zeros(s, np.uint32), np.zeros(s, np.int32)

  # --------------------------------------------------------------------------- public

  def clock(self) -> tuple[int, int]:
    """(decode steps, prefill calls) run so far: the engine's clock, which no host load moves
    (a request's `ttft_calls` counts them between its submit and its first token)."""
    return self.stats["decode_steps"], self.stats["prefill_calls"]

  def check(self, prompt: Sequence[int], params: SamplingParams) -> None:
    """Raises ValueError saying what to change when a request cannot run."""
    params.check()
    if not prompt:
      raise ValueError("the prompt is empty: give at least one token")
    vocab = self.model.cfg.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
      raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
    if len(prompt) + params.max_tokens > self.max_len:
      room = max(self.max_len - len(prompt), 0)
      raise ValueError(f"the prompt's {len(prompt)} tokens + max_tokens {params.max_tokens} = "
                       f"{len(prompt) + params.max_tokens} exceed this server's {self.max_len}: "
                       f"shorten the prompt or ask for at most {room} tokens")
    if params.stop and self.tokenizer is None:
      raise ValueError("stop strings need a tokenizer: give the engine one")

  def submit(self, prompt: Sequence[int], params: SamplingParams,
             on_event: Callable[[Event], None]) -> Handle:
    """Queues a request; on_event is called from the engine thread. Raises ValueError (bad
    request) or QueueFull."""
    prompt = [int(t) for t in prompt]
    self.check(prompt, params)
    with self._cond:
      if len(self._waiting) >= self.max_queue:
        raise QueueFull(f"{len(self._waiting)} requests are waiting for one of {self.slots} slots")
      handle = Handle(self, next(self._ids), prompt, params, on_event)
      self._waiting.append(handle)
      self._cond.notify()
    return handle

  def generate(self, prompt: Sequence[int], params: SamplingParams, timeout: float | None = None) -> Result:
    """Blocks until the request ends (the engine must be running: `start()`)."""
    done, parts = threading.Event(), []

    def on_event(ev: Event):
      parts.append(ev)
      if ev.finish_reason:
        done.set()
    handle = self.submit(prompt, params, on_event)
    if not done.wait(timeout):
      handle.cancel()
      raise TimeoutError(f"no result in {timeout} s")
    last = parts[-1]
    if last.error:
      raise RuntimeError(last.error)
    return Result("".join(p.text for p in parts), [t for p in parts for t in p.tokens],
                  last.finish_reason, len(handle.prompt), handle.prefilled,
                  (handle.first_token_at or time.perf_counter()) - handle.submitted,
                  handle.ttft_calls)

  def start(self) -> "Engine":
    if self._thread is None:
      self._stopping = False
      self._thread = threading.Thread(target=self._run, name="bigmodel-engine", daemon=True)
      self._thread.start()
    return self

  def stop(self) -> None:
    with self._cond:
      self._stopping = True
      self._cond.notify()
    if self._thread is not None:
      self._thread.join()
      self._thread = None

  def load(self) -> dict:
    """Slots in use and requests waiting (for /health)."""
    with self._cond:
      return {"slots": self.slots, "active": sum(s is not None for s in self._active),
              "waiting": len(self._waiting)}

  def warmup(self) -> None:
    """Compiles every program the engine runs (on slot 0; the cache is left as it was)."""
    z = np.int32(0)
    for k in self.prefill_rows:
      rows = np.arange(k, dtype=np.int32)
      for c in self.chunk_sizes:
        self.cache, _ = _prefill_jit(self.model, self.params, self.cache, rows,
                                     np.zeros((k, c), np.int32), np.ones(k, np.int32),
                                     np.zeros(k, np.int32), np.zeros(k, np.float32),
                                     np.zeros(k, np.int32), np.ones(k, np.float32),
                                     np.zeros(k, np.uint32))
    page = _read_page_jit(self.cache, z, z, size=self.page)
    self.cache = _write_page_jit(self.cache, z, z, page)
    for k, span in itertools.product(sorted({1, self.decode_steps}), self.spans):
      self.cache, tok = _decode_jit(self._span_models[span], self.params, self.cache, self._tok,
                                    np.zeros(self.slots, bool), self._temp, self._top_k,
                                    self._top_p, self._seed, self._step, k=k)
    jax.block_until_ready(tok)

  # --------------------------------------------------------------------------- the loop

  def _wake(self) -> None:
    with self._cond:
      self._cond.notify()

  def _run(self) -> None:
    while True:
      with self._cond:
        while not (self._stopping or self._waiting or any(s is not None for s in self._active)):
          self._cond.wait()
        if self._stopping:
          break
      try:
        self.step()
      except Exception as e:  # noqa: BLE001 - fail the requests in flight, keep serving
        log.exception("engine step failed")
        self._fail_all("error", f"internal error: {type(e).__name__}: {e}")
        self.cache = nn.meta.unbox(decode.init_cache(self.model, self.slots, self.cache_len))
    self._fail_all("cancelled", None)

  def step(self) -> None:
    """One turn of the loop: drop cancelled requests, admit waiting ones to free slots, run
    the prefill calls, then one decode call. `start()` runs it on the engine's thread; a test
    or a simulation (bigmodel.infer.sim_serve) may call it on an engine it did not start."""
    self._drop_cancelled()
    self._admit()
    self._prefill()
    self._decode()

  def _fail_all(self, reason: str, error: str | None) -> None:
    with self._cond:
      waiting, self._waiting = list(self._waiting), collections.deque()
    for h in waiting:
      self._send(h, Event(finish_reason=reason, error=error))
    for i, s in enumerate(self._active):
      if s is not None:
        self._send(s.handle, Event(finish_reason=reason, error=error))
        self._free(i)

  @staticmethod
  def _send(handle: Handle, ev: Event) -> None:
    try:
      handle.on_event(ev)
    except Exception:  # noqa: BLE001 - a consumer's bug must not stop the engine
      log.exception("request %d: on_event failed; cancelling it", handle.id)
      handle.cancelled = True

  def _drop_cancelled(self) -> None:
    with self._cond:
      gone = [h for h in self._waiting if h.cancelled]
      for h in gone:
        self._waiting.remove(h)
    for h in gone:
      self._send(h, Event(finish_reason="cancelled"))
    for i, s in enumerate(self._active):
      if s is not None and s.handle.cancelled:
        self._send(s.handle, Event(finish_reason="cancelled"))
        self._free(i)
        self.stats["cancelled"] += 1

  def _admit(self) -> None:
    for i in range(self.slots):
      if self._active[i] is not None:
        continue
      with self._cond:
        if not self._waiting:
          return
        h = self._waiting.popleft()
      key, n = self.store.lookup(h.prompt)
      if key is not None:
        for j, page in enumerate(self.store.pages(key)[:-(-n // self.page)]):
          self.cache = _write_page_jit(self.cache, np.int32(i), np.int32(j * self.page), page)
      h.prefilled = len(h.prompt) - n
      self.stats["reused_tokens"] += n
      self._active[i] = _Slot(h, n)
      p = h.params
      self._temp[i], self._top_k[i], self._top_p[i] = p.temperature, p.top_k, p.top_p
      self._seed[i], self._step[i] = p.seed % 2**32, 0

  def _chunk(self, i: int) -> int:
    rest = len(self._active[i].handle.prompt) - self._active[i].pos
    return next((c for c in self.chunk_sizes if c >= rest), self.chunk_sizes[-1])

  def _prefill(self) -> None:
    """The waiting prompts' chunks, oldest first, up to prefill_rows slots a call (those whose
    next chunk has the oldest's size), until none is left or, while others decode, the step's
    prefill_budget is spent; requests that arrived meanwhile are admitted before each call."""
    budget = self.prefill_budget if any(s is not None and s.decoding for s in self._active) else None
    spent = 0
    while budget is None or spent < budget:
      self._admit()                    # requests that came during the last call join this step
      waiting = sorted((s.handle.id, i) for i, s in enumerate(self._active)
                       if s is not None and not s.decoding)
      if not waiting:
        return
      c = self._chunk(waiting[0][1])
      group = [i for _, i in waiting if self._chunk(i) == c]
      k = max(r for r in self.prefill_rows if r <= len(group))
      self._prefill_call(group[:k], c)
      spent += k * c

  def _prefill_call(self, rows: list[int], c: int) -> None:
    k = len(rows)
    tokens = np.zeros((k, c), np.int32)
    n_valid, pos = np.zeros(k, np.int32), np.zeros(k, np.int32)
    for r, i in enumerate(rows):
      s = self._active[i]
      n = min(len(s.handle.prompt) - s.pos, c)
      tokens[r, :n] = s.handle.prompt[s.pos:s.pos + n]
      n_valid[r], pos[r] = n, s.pos
    idx = np.array(rows, np.int32)
    self.cache, tok = _prefill_jit(self.model, self.params, self.cache, idx, tokens, n_valid, pos,
                                   self._temp[idx], self._top_k[idx], self._top_p[idx],
                                   self._seed[idx])
    tok = self._wait(tok)
    self.stats["prefill_calls"] += 1
    self.stats["prefill_chunks"] += k
    self.stats["prefill_tokens"] += int(n_valid.sum())
    for r, i in enumerate(rows):
      s = self._active[i]
      s.pos += int(n_valid[r])
      s.fed = s.pos
      if s.pos == len(s.handle.prompt):
        s.decoding = True
        h = s.handle
        h.first_token_at = time.perf_counter()
        h.ttft_calls = tuple(a - b for a, b in zip(self.clock(), h.clock0))
        self.first_tokens.append(h.ttft_calls)
        self._step[i] = 1
        self._tok[i] = int(tok[r])
        self._accept(i, int(tok[r]))

  def _wait(self, tok) -> np.ndarray:
    """The sampled ids on the host; the time spent waiting for them is `stats["device_wait_s"]`
    (the rest of the engine thread's time is its host work: Python, dispatch, the requests)."""
    t = time.perf_counter()
    tok = np.asarray(tok)
    self.stats["device_wait_s"] += time.perf_counter() - t
    return tok

  def _steps_now(self, active: np.ndarray) -> int:
    """decode_steps when nothing waits (no queue, no prompt left to prefill), no slot was freed
    by the last step (a client that got its answer often sends its next request at once) and
    every decoding row wants at least that many more tokens; else 1 (a new request is not held
    back)."""
    k, freed, self._freed = self.decode_steps, self._freed, False
    if k == 1 or freed or self._waiting or any(s is not None and not s.decoding
                                               for s in self._active):
      return 1
    rest = min(self._active[i].handle.params.max_tokens - len(self._active[i].generated)
               for i in np.flatnonzero(active))
    return k if rest >= k else 1

  def _decode(self) -> None:
    active = np.array([s is not None and s.decoding for s in self._active])
    if not active.any():
      return
    k = self._steps_now(active)
    need = max(self._active[i].fed for i in np.flatnonzero(active)) + k   # slots read, at most
    span = next((n for n in self.spans if n >= need), self.cache_len)
    self.stats["decode_span_slots"] += span
    self.cache, toks = _decode_jit(self._span_models[span], self.params, self.cache, self._tok,
                                   active, self._temp, self._top_k, self._top_p, self._seed,
                                   self._step, k=k)
    toks = self._wait(toks)
    self.stats["decode_calls"] += 1
    self.stats["decode_steps"] += k
    self.stats["decode_rows"] += k * int(active.sum())
    for tok in toks:
      for i in np.flatnonzero(active):
        s = self._active[i]
        if s is None or s.handle.cancelled:      # ended at an earlier step of this call
          continue
        s.fed += 1
        self._step[i] += 1
        self._tok[i] = tok[i]
        self._accept(i, int(tok[i]))

  def _accept(self, i: int, t: int) -> None:
    """Hands slot i's new token to its request; ends it at EOS, a stop string or max_tokens."""
    s = self._active[i]
    p = s.handle.params
    if t == self.eos_id and not p.ignore_eos:
      return self._finish(i, Event(text=self._text(s)[s.sent:], finish_reason="stop"))
    s.generated.append(t)
    text = self._text(s)
    cut = min((at for at in (text.find(x) for x in p.stop) if at >= 0), default=-1)
    if cut >= 0:
      return self._finish(i, Event(text[s.sent:cut], [t], "stop"))
    if len(s.generated) >= p.max_tokens:
      return self._finish(i, Event(text[s.sent:], [t], "length"))
    end = len(text) - _stop_holdback(text, p.stop)
    ev = Event(text[s.sent:end] if end > s.sent else "", [t])
    s.sent = max(s.sent, end)
    self._send(s.handle, ev)

  def _text(self, s: _Slot) -> str:
    return self.tokenizer.decode(s.generated) if self.tokenizer is not None else ""

  def _finish(self, i: int, ev: Event) -> None:
    s = self._active[i]
    if 0 < -(-s.fed // self.page) * self.store.page_bytes <= self.store.max_bytes:
      tokens = tuple(s.handle.prompt + s.generated)[:s.fed]
      pages = [_read_page_jit(self.cache, np.int32(i), np.int32(j * self.page), size=self.page)
               for j in range(-(-s.fed // self.page))]
      self.store.add(tokens, pages)
    self.stats["finished"] += 1
    self._free(i)
    self._send(s.handle, ev)

  def _free(self, i: int) -> None:
    self._active[i] = None
    self._freed = True
    self._temp[i], self._top_k[i], self._top_p[i], self._step[i] = 0, 0, 1, 0
