"""Generation with a KV cache: a prefill of the prompts, then a `lax.while_loop` of one-token
steps, in one jitted function.

    gen = Generator(model, params)            # a Decoder (with or without a mesh) and its params
    out = gen(prompts, max_new_tokens, temperature=0.8, top_k=40, top_p=0.95, seed=0,
              eos_id=tokenizer.eos_id)        # prompts: lists of token ids
    out[i].tokens, out[i].finish              # the new ids (EOS dropped); "eos" or "length"

Layout: right padding. The prompts sit at the left of a [b, p] block (p: the longest prompt
rounded up to `bucket`), each at positions 0, 1, .. as in training. The prefill feeds the whole
block at once with segment id 0 on the padding, so each row's cache index stops at its own
length (models/decoder.py) and its first new token overwrites its padding; from then on each
unfinished row moves one slot a step and a finished one stands still. Every row therefore sees
exactly what it sees alone: a batch gives the same greedy tokens as one prompt at a time.
(Left padding, the other common choice, would shift each row's positions and need a padding
mask kept beside the cache.) A decoder with scanned layers decodes as its unrolled twin, with
the same params unstacked once per call (`unstack_layers` says why).

A row stops at EOS or after its max_new_tokens; the loop ends when every row has stopped.
Compiles: one per (batch, prompt block p, cache length t), with t the longest prompt plus its
new tokens rounded up to `bucket` (at most ModelConfig.max_len); token counts, sampling
settings and the seed are traced values. With learned positions prompt + new tokens must fit
in ModelConfig.max_len (a ConfigError says what to change); RoPE has no such table, so only
memory bounds t.

Sampling: temperature 0 is greedy (argmax). Otherwise logits / temperature, then top-k (k > 0
keeps the k most likely tokens and any tied with the k-th), then top-p (the smallest set of
most likely tokens whose probability, after top-k, reaches p; ties with its last token stay),
then a categorical draw. Step i draws with fold_in(key(seed), i): same seed, same tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from bigmodel import sharding
from bigmodel.config import ConfigError


# ----------------------------------------------------------------------------- sampling


def filter_logits(logits: jax.Array, top_k, top_p) -> jax.Array:
  """logits [b, v] with -inf outside the top-k and the top-p nucleus (k 0 or p >= 1: off).

  One sort serves both, so k and p may be traced values (a server changes them per request
  without a compile)."""
  v = logits.shape[-1]
  desc = -jnp.sort(-logits, axis=-1)                                     # b v, most likely first
  rank = jnp.arange(v)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  in_k = rank < k
  probs = jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf), axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs                          # mass of the likelier ones
  keep = in_k & ((before < top_p) | (top_p >= 1.0))                    # a prefix of `desc`
  kept = jnp.maximum(jnp.sum(keep, axis=-1, keepdims=True), 1)
  threshold = jnp.take_along_axis(desc, kept - 1, axis=-1)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample_logits(logits: jax.Array, rng: jax.Array, temperature, top_k=0, top_p=1.0) -> jax.Array:
  """logits [b, v] -> token ids [b]: greedy at temperature <= 0, else filtered sampling.

  Settings given as Python numbers pick their branch here (an eager caller compiles nothing
  new per token); traced ones (the jitted loop) choose with lax.cond."""
  known = lambda x: isinstance(x, (int, float))
  greedy = lambda _: jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def draw(_):
    scaled = logits / jnp.maximum(temperature, 1e-6)
    if known(top_k) and known(top_p):
      if top_k > 0 or top_p < 1.0:
        scaled = filter_logits(scaled, top_k, top_p)
    else:
      scaled = jax.lax.cond((top_k > 0) | (top_p < 1.0), lambda x: filter_logits(x, top_k, top_p),
                            lambda x: x, scaled)
    return jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)

  if known(temperature):
    return greedy(None) if temperature <= 0 else draw(None)
  return jax.lax.cond(temperature > 0, draw, greedy, None)


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
  if not temperature >= 0:
    raise ValueError(f"temperature={temperature}: use 0 (greedy) or a positive number")
  if top_k < 0:
    raise ValueError(f"top_k={top_k}: use 0 (off) or a positive number of tokens")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p}: use a probability in (0, 1]; 1 turns it off")


# ----------------------------------------------------------------------------- the cache


def position_limit(cfg) -> int | None:
  """The most tokens (prompt + new) one row may hold: max_len with learned positions."""
  return cfg.max_len if cfg.positions == "learned" else None


def init_cache(model, batch: int, length: int):
  """The zero KV cache of a Decoder for `batch` rows of `length` slots, boxed with its logical
  axes (("layers",) + act_batch, act_len, act_heads, act_kv; the index: act_batch)."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((batch, length), jnp.int32),
                                             decode=True))["cache"]
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _zero_cache(model, batch: int, length: int):
  boxed = init_cache(model, batch, length)
  cache = nn.meta.unbox(boxed)
  if model.mesh is not None:
    shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed), model.mesh, cache)
    cache = jax.lax.with_sharding_constraint(cache, shardings)
  return cache


# ----------------------------------------------------------------------------- generation


@dataclasses.dataclass(frozen=True)
class Completion:
  tokens: list[int]     # the new tokens, without the EOS that ended them
  finish: str           # "eos" or "length"


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _emit(buf, count, done, tok, lengths, limits, eos):
  """Writes each unfinished row's new token after its text and updates the stop flags."""
  rows = jnp.arange(buf.shape[0])
  at = jnp.minimum(lengths + count, buf.shape[1] - 1)
  buf = buf.at[rows, at].set(jnp.where(done, buf[rows, at], tok))
  count = count + (~done).astype(count.dtype)
  done = done | (tok == eos) | (count >= limits)
  return buf, count, done


def unstack_layers(model, params):
  """(the unrolled twin of a scanned decoder, its params): `layers` [n, ...] -> layer_0 .. n-1.

  Generation decodes with unrolled layers. Scanned, every step sliced (copied, on XLA:CPU)
  every layer's weights out of the stack inside the loop (README "Serving"). Called inside the
  jitted function, the slices run once per call, before the loop (a temporary second copy of
  the layer weights)."""
  if not model.cfg.scan_layers:
    return model, params
  cfg = dataclasses.replace(model.cfg, scan_layers=False)
  params = dict(nn.meta.unbox(params))
  stacked = params["blocks"]["layers"]
  params["blocks"] = {f"layer_{i}": jax.tree.map(lambda a, i=i: a[i], stacked)
                      for i in range(cfg.num_layers)}
  return model.clone(cfg=cfg), params


def _generate(model, params, tokens, lengths, limits, eos, temperature, top_k, top_p, seed, *,
              cache_len: int):
  """(text [b, cache_len]: prompts then their new tokens, new-token counts [b])."""
  model, params = unstack_layers(model, params)
  b, p = tokens.shape
  key = jax.random.key(seed)
  sample = lambda logits, i: sample_logits(logits, jax.random.fold_in(key, i), temperature,
                                           top_k, top_p)
  run = functools.partial(model.apply, decode=True, mutable=["cache"])
  valid = (jnp.arange(p)[None, :] < lengths[:, None]).astype(jnp.int32)
  logits, state = run({"params": params, "cache": _zero_cache(model, b, cache_len)}, tokens,
                      segment_ids=valid)                                       # prefill
  tok = sample(logits[jnp.arange(b), lengths - 1], 0)
  buf = jnp.zeros((b, cache_len), jnp.int32).at[:, :p].set(tokens)
  buf, count, done = _emit(buf, jnp.zeros(b, jnp.int32), limits <= 0, tok, lengths, limits, eos)

  def step(carry):
    i, cache, buf, tok, count, done = carry
    logits, state = run({"params": params, "cache": cache}, tok[:, None],
                        segment_ids=(~done)[:, None].astype(jnp.int32))
    tok = sample(logits[:, 0], i)
    buf, count, done = _emit(buf, count, done, tok, lengths, limits, eos)
    return i + 1, state["cache"], buf, tok, count, done

  carry = (jnp.int32(1), state["cache"], buf, tok, count, done)
  _, _, buf, _, count, _ = jax.lax.while_loop(lambda c: ~jnp.all(c[-1]), step, carry)
  return buf, count


# Flax modules hash and compare by their fields (config, mesh), so every Generator of an equal
# model shares these compiles: sample, chat, greedy_decode and the server.
_generate_jit = jax.jit(_generate, static_argnums=(0,), static_argnames=("cache_len",))


class Generator:
  """Cached generation for one decoder and its params; see the module docstring."""

  def __init__(self, model, params, *, bucket: int = 16, pad_id: int = 0):
    self.model, self.params = model, params
    self.cfg = model.cfg
    self.bucket, self.pad_id = bucket, pad_id
    self.limit = position_limit(self.cfg)

  def check_length(self, prompt_len: int, max_new_tokens: int, limit: int | None = None) -> None:
    limit = self.limit if limit is None else limit
    if limit is not None and prompt_len + max_new_tokens > limit:
      room = max(limit - prompt_len, 0)
      raise ConfigError(
          f"a prompt of {prompt_len} tokens + {max_new_tokens} new tokens = "
          f"{prompt_len + max_new_tokens} exceeds the {limit} positions of this model "
          f"(ModelConfig.max_len): shorten the prompt or set max_new_tokens to at most {room}")

  def __call__(self, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int], *,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               eos_id: int | None = None, max_len: int | None = None,
               batch_multiple: int = 1) -> list[Completion]:
    """Continues each prompt (token ids) by up to max_new_tokens (one count, or one a prompt).

    max_len: the most tokens a row may hold (default: ModelConfig.max_len with learned
    positions, no limit with RoPE). batch_multiple: pad the batch to a multiple of this (the
    data-parallel size of the mesh)."""
    prompts = [[int(t) for t in p] for p in prompts]
    if not prompts:
      return []
    n = len(prompts)
    limits = [int(max_new_tokens)] * n if np.ndim(max_new_tokens) == 0 else [int(m) for m in max_new_tokens]
    if len(limits) != n:
      raise ValueError(f"{len(limits)} max_new_tokens for {n} prompts")
    check_sampling(temperature, top_k, top_p)
    for i, (p, m) in enumerate(zip(prompts, limits)):
      if not p:
        raise ValueError(f"prompt {i}: empty; give at least one token (e.g. the EOS id as a start)")
      if m < 0:
        raise ValueError(f"prompt {i}: max_new_tokens={m}; use a count >= 0")
      self.check_length(len(p), m, max_len)
    vocab = self.cfg.vocab_size
    bad = [t for p in prompts for t in p if not 0 <= t < vocab]
    if bad:
      raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")

    b = _round_up(n, max(batch_multiple, 1))
    longest = max(len(p) for p in prompts)
    cache_len = _round_up(max(len(p) + m for p, m in zip(prompts, limits)), self.bucket)
    limit = self.limit if max_len is None else max_len
    if limit is not None:
      cache_len = min(cache_len, max(limit, longest))
    block = min(_round_up(longest, self.bucket), cache_len)
    tokens = np.full((b, block), self.pad_id, np.int32)
    lengths = np.ones(b, np.int32)
    lims = np.zeros(b, np.int32)                      # padding rows: done from the start
    for r, (p, m) in enumerate(zip(prompts, limits)):
      tokens[r, :len(p)] = p
      lengths[r], lims[r] = len(p), m
    eos = -1 if eos_id is None else int(eos_id)
    buf, count = jax.device_get(_generate_jit(
        self.model, self.params, tokens, lengths, lims, np.int32(eos), np.float32(temperature),
        np.int32(top_k), np.float32(top_p), np.uint32(seed % 2**32), cache_len=cache_len))
    out = []
    for r, p in enumerate(prompts):
      gen = [int(t) for t in buf[r, len(p):len(p) + count[r]]]
      if gen and gen[-1] == eos:
        out.append(Completion(gen[:-1], "eos"))
      else:
        out.append(Completion(gen, "length"))
    return out


def generate(model, params, prompts, max_new_tokens, **kw) -> list[Completion]:
  """`Generator(model, params)(prompts, max_new_tokens, **kw)`."""
  return Generator(model, params)(prompts, max_new_tokens, **kw)
