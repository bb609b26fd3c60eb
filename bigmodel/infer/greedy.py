"""Batched greedy decoding with the KV cache (bigmodel.infer.decode), stopping at EOS.

    greedy_decode(model, params, prompts, window, eos_id, max_new_tokens, batch_size)
      prompts        token-id lists (each at most window - 1 long; longer ones keep their end)
      -> per prompt the generated ids (without the prompt, cut before the first EOS)

A row holds at most `window` tokens (prompt + generated) at positions 0.., as
`bigmodel.infer.sample.generate` lays out one prompt, so at temperature 0 both give the same
tokens while the text fits the window. A row stops at EOS, after max_new_tokens (0: until the
window is full), or at the window's end. Prompts are decoded in order of length (a batch's
cache is as long as its longest row needs, and shorter batches end sooner) and returned in
input order; a last partial batch is padded (the batch size is kept a multiple of `multiple`,
the data-parallel size). Compiles: one per (batch, prompt bucket, cache length).

`greedy_decode_windowed` is the former decoder without a cache (a full forward over the first
w columns each step, w widened in steps of `bucket` as rows grow), kept as the reference that
tests and `bench_decode` hold the cache against; it returns the same tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bigmodel.infer import decode


def greedy_decode(model, params, prompts, window: int, eos_id: int | None, max_new_tokens: int = 0,
                  batch_size: int = 8, multiple: int = 1, pad_id: int = 0,
                  bucket: int = 16) -> list[list[int]]:
  """Greedy continuations of `prompts` (lists of ids); see the module docstring."""
  if not prompts:
    return []
  batch_size = min(batch_size, len(prompts))
  batch_size = max(multiple, -(-batch_size // multiple) * multiple)
  max_new = window if max_new_tokens <= 0 else max_new_tokens
  prompts = [list(p)[-(window - 1):] for p in prompts]
  if any(len(p) == 0 for p in prompts):
    raise ValueError("greedy_decode: an empty prompt (give at least one token)")
  gen = decode.Generator(model, params, bucket=bucket, pad_id=pad_id)
  order = np.argsort([len(p) for p in prompts], kind="stable")
  out: list[list[int]] = [[] for _ in prompts]
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    rows = [prompts[i] for i in idx]
    limits = [min(window, len(p) + max_new) - len(p) for p in rows]
    res = gen(rows, limits, temperature=0.0, eos_id=eos_id, max_len=window,
              batch_multiple=batch_size)
    for i, r in zip(idx, res):
      out[i] = r.tokens
  return out


@functools.lru_cache(maxsize=16)
def _windowed_decoder(model, eos_id: int):
  """(params, buf [b, w], lengths, limits, done) -> (buf, lengths, done) after decoding until
  every row is done or has filled the w columns of `buf`."""
  @jax.jit
  def run(params, buf, lengths, limits, done):
    rows = jnp.arange(buf.shape[0])
    width = buf.shape[1]

    def cond(state):
      buf, lengths, done = state
      return ~jnp.all(done | (lengths >= width))

    def body(state):
      buf, lengths, done = state
      stop = done | (lengths >= width)
      logits = model.apply({"params": params}, buf, deterministic=True)     # [b, w, v]
      nxt = jnp.argmax(logits[rows, lengths - 1], -1).astype(buf.dtype)
      at = jnp.minimum(lengths, width - 1)
      buf = buf.at[rows, at].set(jnp.where(stop, buf[rows, at], nxt))
      lengths = jnp.where(stop, lengths, lengths + 1)
      done = done | (~stop & ((nxt == eos_id) | (lengths >= limits)))
      return buf, lengths, done

    return jax.lax.while_loop(cond, body, (buf, lengths, done))
  return run


def greedy_decode_windowed(model, params, prompts, window: int, eos_id: int | None,
                           max_new_tokens: int = 0, batch_size: int = 8, multiple: int = 1,
                           pad_id: int = 0, bucket: int = 16, warm_only: bool = False):
  """`greedy_decode` without a cache (the reference). warm_only: compile every width and stop."""
  if not prompts:
    return []
  batch_size = min(batch_size, len(prompts))
  batch_size = max(multiple, -(-batch_size // multiple) * multiple)
  max_new = window if max_new_tokens <= 0 else max_new_tokens
  eos = -1 if eos_id is None else int(eos_id)
  run = _windowed_decoder(model, eos)
  prompts = [list(p)[-(window - 1):] for p in prompts]
  order = np.argsort([len(p) for p in prompts], kind="stable")
  out: list[list[int]] = [[] for _ in prompts]
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    buf = np.full((batch_size, window), pad_id, np.int32)
    lengths = np.ones(batch_size, np.int32)
    limits = np.ones(batch_size, np.int32)        # padding rows: done from the start
    for r, i in enumerate(idx):
      p = prompts[i]
      buf[r, :len(p)] = p
      lengths[r] = len(p)
      limits[r] = min(window, len(p) + max_new)
    done = lengths >= limits
    if warm_only:
      for width in sorted({min(window, -(-(n + 1) // bucket) * bucket)
                           for n in range(int(lengths.min()), int(limits.max()))}):
        jax.block_until_ready(run(params, jnp.asarray(buf[:, :width]), jnp.asarray(lengths),
                                  jnp.asarray(limits), jnp.ones_like(jnp.asarray(done))))
      continue
    while not done.all():   # widen the window in steps of `bucket` columns as rows grow
      width = min(window, -(-(int(lengths[~done].max()) + 1) // bucket) * bucket)
      part, lengths, done = jax.device_get(run(params, jnp.asarray(buf[:, :width]),
                                               jnp.asarray(lengths), jnp.asarray(limits),
                                               jnp.asarray(done)))
      buf[:, :width] = part
      lengths, done = np.array(lengths), np.array(done) | (lengths >= window)
    for r, i in enumerate(idx):
      gen = [int(t) for t in buf[r, len(prompts[i]):lengths[r]]]
      if eos in gen:
        gen = gen[:gen.index(eos)]
      out[i] = gen
  return out
