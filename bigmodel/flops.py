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

import dataclasses
import json
import logging
import os
import platform
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from bigmodel.config import ModelConfig

log = logging.getLogger(__name__)


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


def measure_matmul_peak(n: int = 2048, dtype=jnp.float32, reps: int = 4, trials: int = 3,
                        pause_s: float = 0.05) -> float:
  """Best FLOP/s of an n x n matmul on the default device over `trials` x `reps` timings.

  The trials are spaced by `pause_s`, so that one burst of load from another process does
  not set the figure; a host busy throughout still measures low (see `Peak`)."""
  key = jax.random.key(0)
  a = jax.random.normal(key, (n, n), dtype)
  b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  f(a, b).block_until_ready()
  best = float("inf")
  for trial in range(trials):
    if trial:
      time.sleep(pause_s)
    for _ in range(reps):
      t = time.perf_counter()
      f(a, b).block_until_ready()
      best = min(best, time.perf_counter() - t)
  return 2 * n ** 3 / best


def cpu_model() -> str:
  """The host CPU's model name (/proc/cpuinfo, else `platform`)."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.lower().startswith(("model name", "hardware", "cpu model")):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine() or "unknown"


def host_info() -> dict:
  """What a speed figure depends on: the CPU, its cores, the devices, the library versions."""
  try:
    usable = len(os.sched_getaffinity(0))
  except (AttributeError, OSError):
    usable = os.cpu_count()
  info = {"host": platform.node(), "cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
          "cpu_usable": usable, "platform": jax.devices()[0].platform,
          "device_kind": jax.devices()[0].device_kind, "device_count": jax.device_count(),
          "jax": jax.__version__}
  for name in ("jaxlib", "torch", "transformers"):
    module = sys.modules.get(name)
    if module is not None and hasattr(module, "__version__"):
      info[name] = module.__version__
  return info


def _peak_file() -> str:
  """Where the best peak measured on each host is kept (`BIGMODEL_PEAK_FILE`; '' for none)."""
  if "BIGMODEL_PEAK_FILE" in os.environ:
    return os.environ["BIGMODEL_PEAK_FILE"]
  cache = os.environ.get("BIGMODEL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache",
                                                               "bigmodel")
  return os.path.join(cache, "peak_flops.json")


def _read_peaks(path: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
    return data if isinstance(data, dict) else {}
  except (OSError, ValueError):
    return {}


def _record_peak(path: str, key: str, value: float) -> float:
  """Keeps the best per-device peak seen for `key` in `path`; returns that best (>= value)."""
  if not path:
    return value
  peaks = _read_peaks(path)
  best = float(peaks.get(key, {}).get("flops_per_device", 0.0))
  if value > best:
    peaks[key] = {"flops_per_device": value, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                          time.gmtime())}
    try:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(os.path.abspath(path)),
                                       delete=False, suffix=".tmp") as f:
        json.dump(peaks, f, indent=1)
      os.replace(f.name, path)
    except OSError as e:
      log.warning("could not record the measured peak in %s: %s", path, e)
  return max(value, best)


@dataclasses.dataclass
class Peak:
  """The peak FLOP/s that MFU divides by, and where it came from.

  Measured (no datasheet figure configured): the best of several timed matmuls now, raised
  to the best ever recorded for this host (same CPU model, core count, device kind and jax
  version, in `BIGMODEL_PEAK_FILE`, default ~/.cache/bigmodel/peak_flops.json), since a
  busy moment at start-up only ever lowers a measurement. When an achieved rate would still
  exceed the peak, the matmul is measured again (`mfu_fields`); an MFU above 1 is never
  reported as a figure."""
  flops: float                 # FLOP/s of all devices this run uses
  source: str
  per_device: float
  scale: int                   # devices (accelerators) or processes (CPU) the peak covers
  key: str = ""                # the host's key in the peak file ("" when configured)
  matmul: tuple = ()           # (n, dtype) of the measurement
  remeasures_left: int = 3     # how often an achieved rate above the peak may trigger a re-measure

  @classmethod
  def for_run(cls, per_device: float | None = None) -> "Peak":
    cpu = jax.devices()[0].platform == "cpu"
    scale = jax.process_count() if cpu else jax.device_count()
    if per_device:
      return cls(per_device * scale, "configured", per_device, scale)
    n, dtype = (2048, jnp.float32) if cpu else (8192, jnp.bfloat16)
    info = host_info()
    key = (f"{info['platform']} | {info['device_kind']} | {info['cpu_model']} | "
           f"{info['cpu_usable']} cores | {jnp.dtype(dtype).name} {n} matmul | jax {info['jax']}")
    peak = cls(0.0, "", 0.0, scale, key, (n, dtype))
    peak.measure()
    return peak

  def measure(self) -> None:
    """Measures the matmul again; the peak becomes the best of this, the last and the record."""
    n, dtype = self.matmul
    now = measure_matmul_peak(n=n, dtype=dtype)
    path = _peak_file()
    best = _record_peak(path, self.key, max(now, self.per_device))
    self.per_device = best
    self.flops = best * self.scale
    where = f"the best recorded on this host in {path}" if path else "the best this run"
    self.source = (f"measured: {jnp.dtype(dtype).name} {n}x{n} matmul, best of 12 timings, "
                   f"{now / 1e9:.1f} GFLOP/s now; {best / 1e9:.1f} GFLOP/s is {where}")

  def mfu_fields(self, flops_per_sec: float) -> dict:
    """{"mfu": achieved / peak}, after measuring the peak again if the ratio exceeds 1. If it
    still does (a configured peak below what the step achieves), no `mfu` but
    `mfu_above_peak`: a string, so that no dashboard plots it as a utilization."""
    ratio = flops_per_sec / self.flops
    if ratio > 1 and self.matmul and self.remeasures_left > 0:
      self.remeasures_left -= 1
      old = self.flops
      self.measure()
      ratio = flops_per_sec / self.flops
      log.warning("MFU would be %.3f of the %.1f GFLOP/s peak measured at start-up; measured "
                  "again: %s", flops_per_sec / old, old / 1e9, self.source)
    if ratio > 1:
      return {"mfu_above_peak": f"{ratio:.3f} of {self.flops / 1e9:.1f} GFLOP/s ({self.source}): "
                                f"the peak is too low to give an MFU", "peak_flops": self.flops}
    return {"mfu": ratio, "peak_flops": self.flops}


def machine_peak(per_device: float | None = None) -> tuple[float, str]:
  """(peak FLOP/s of all devices this run uses, how it was obtained); see `Peak`.

  On CPU, fake devices share the host's cores, so the peak is one host's measured
  matmul rate times the number of processes; on accelerators, per-device times devices.
  """
  peak = Peak.for_run(per_device)
  return peak.flops, peak.source
