"""Text in, text out: `generate` continues one prompt with the KV cache (bigmodel.infer.decode).

The model sees at most `window` tokens (the training context, DataConfig.seq_len), as before the
cache: past it a text keeps its last window // 2 tokens, which are prefilled again, once per
window // 2 new tokens (not a full forward per token). Until then the tokens are the same.

`generate_windowed` is the former loop, one full forward of the fixed window per token and no
cache, kept as the reference that tests and `bench_decode` hold the cache against.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bigmodel.infer import decode


def sample_logits(logits, rng, temperature: float, top_k: int, top_p: float = 1.0):
  """logits [b, v] -> token ids [b]: greedy at temperature 0, else top-k / top-p sampling."""
  return decode.sample_logits(logits, rng, temperature, top_k, top_p)


def prompt_ids(tokenizer, prompt: str) -> tuple[list[int], bool]:
  """(ids, whether the first id is a stand-in start token): an empty prompt starts from EOS
  (or id 0 without one) and that token is left out of the text."""
  ids = list(tokenizer.encode(prompt)) if prompt else []
  if ids:
    return ids, False
  return [tokenizer.eos_id if tokenizer.eos_id is not None else 0], True


def generate(model, params, tokenizer, prompt: str, num_tokens: int, window: int, *,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> str:
  """Returns prompt + `num_tokens` generated tokens, decoded (EOS does not stop it)."""
  ids, strip_first = prompt_ids(tokenizer, prompt)
  limit = decode.position_limit(model.cfg)
  window = max(2, min(window, limit) if limit else window)
  gen = decode.Generator(model, params)
  out, rounds = list(ids), 0
  while len(out) - len(ids) < num_tokens:
    context = out[-window:] if rounds == 0 else out[-(window // 2):]
    new = min(num_tokens - (len(out) - len(ids)), window - len(context) + 1)
    res = gen([context], new, temperature=temperature, top_k=top_k, top_p=top_p,
              seed=seed + 7919 * rounds, max_len=window + 1)
    out += res[0].tokens
    rounds += 1
  return tokenizer.decode(out[1:] if strip_first else out)


@functools.lru_cache(maxsize=16)
def _windowed_step(model, temperature: float, top_k: int, top_p: float):
  @jax.jit
  def next_token(params, tokens, length, rng):
    logits = model.apply({"params": params}, tokens[None], deterministic=True)
    return sample_logits(logits[:, length - 1], rng, temperature, top_k, top_p)[0]
  return next_token


def generate_windowed(model, params, tokenizer, prompt: str, num_tokens: int, window: int, *,
                      temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                      seed: int = 0) -> str:
  """The no-cache reference: each token is one forward of the last `window` tokens."""
  ids, strip_first = prompt_ids(tokenizer, prompt)
  next_token = _windowed_step(model, temperature, top_k, top_p)
  rng = jax.random.key(seed)
  for i in range(num_tokens):
    context = ids[-window:]
    buf = np.zeros(window, np.int32)
    buf[:len(context)] = context
    tok = next_token(params, jnp.asarray(buf), len(context), jax.random.fold_in(rng, i))
    ids.append(int(tok))
  return tokenizer.decode(ids[1:] if strip_first else ids)
