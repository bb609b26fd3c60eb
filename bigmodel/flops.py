"""Model FLOPs per token and the machine's measured matmul peak, for MFU.

Training FLOPs per token follow the PaLM paper, appendix B: 6*N + 12*L*H*Q*T, with N
the parameters except position embeddings (a tied output embedding counts once),
L layers, H heads, Q head dim, T sequence length. The `causal` variant (MaxText's
convention) counts half the attention term, since a causal mask skips half of it.

N counts the token embedding because a causal LM multiplies every position by it (the
tied output projection). Objectives that project fewer positions onto the vocabulary say so
with `output_fraction` (the share of positions that reach the vocabulary): BERT's masked LM
projects only its gathered masked positions (20 of 128) through the MLM transform and the
output embedding; classification, tagging and QA heads never touch the vocabulary (a
lookup costs no FLOPs). Those positions' V*d (and the d*d MLM transform) are then counted
at that fraction, so that MFU is not overstated.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from bigmodel.config import ModelConfig


def training_flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int,
                             causal_attention: bool = False, output_fraction: float = 1.0,
                             output_params: int | None = None) -> float:
  """output_params: the params applied only at output positions (default: the V*d embedding)."""
  attn = 12 * cfg.num_layers * cfg.num_heads * cfg.dim_per_head * seq_len
  if causal_attention:
    attn /= 2
  if output_params is None:
    output_params = cfg.vocab_size * cfg.d_model
  return 6 * (n_params - (1.0 - output_fraction) * output_params) + attn


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, reps: int = 10) -> float:
  """Best-of-`reps` FLOP/s of an n x n matmul on the default device."""
  key = jax.random.key(0)
  a = jax.random.normal(key, (n, n), dtype)
  b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def machine_peak(per_device: float | None = None) -> tuple[float, str]:
  """(peak FLOP/s of all devices this run uses, how it was obtained).

  On CPU, fake devices share the host's cores, so the peak is one host's measured
  matmul rate times the number of processes; on accelerators, per-device times devices.
  """
  cpu = jax.devices()[0].platform == "cpu"
  how = "configured"
  if not per_device:
    per_device = measure_matmul_peak(dtype=jnp.float32 if cpu else jnp.bfloat16,
                                     n=2048 if cpu else 8192)
    how = f"measured ({'f32 2048' if cpu else 'bf16 8192'} matmul)"
  scale = jax.process_count() if cpu else jax.device_count()
  return per_device * scale, how
