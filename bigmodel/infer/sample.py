"""Autoregressive sampling without a KV cache: the model sees a fixed window each step.

The window is `window` tokens (the training context); the prompt sits at its left
and the last `window` tokens are kept once the text grows longer. One compiled
forward serves every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def sample_logits(logits, rng, temperature: float, top_k: int):
  """logits [b, v] -> token ids [b]: greedy at temperature 0, else top-k sampling."""
  if temperature <= 0:
    return jnp.argmax(logits, -1)
  logits = logits / temperature
  if top_k and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1)


def generate(model, params, tokenizer, prompt: str, num_tokens: int, window: int, *,
             temperature: float = 1.0, top_k: int = 0, seed: int = 0) -> str:
  """Returns prompt + `num_tokens` generated tokens, decoded."""
  ids = list(tokenizer.encode(prompt)) if prompt else []
  if not ids:
    ids = [tokenizer.eos_id if tokenizer.eos_id is not None else 0]
    strip_first = True
  else:
    strip_first = False

  @jax.jit
  def next_token(params, tokens, length, rng):
    logits = model.apply({"params": params}, tokens[None], deterministic=True)
    return sample_logits(logits[:, length - 1], rng, temperature, top_k)[0]

  rng = jax.random.key(seed)
  for i in range(num_tokens):
    context = ids[-window:]
    buf = np.zeros(window, np.int32)
    buf[:len(context)] = context
    tok = next_token(params, jnp.asarray(buf), len(context), jax.random.fold_in(rng, i))
    ids.append(int(tok))
  return tokenizer.decode(ids[1:] if strip_first else ids)
