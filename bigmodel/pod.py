"""`bigmodel compile --topology`: fit, memory and cost of an experiment on a Cloud TPU slice.

Compiles the real train and eval steps for the slice (bigmodel.aot, bigmodel.topology) and
reports per-chip HBM against the chip table, whether it fits with headroom, optionally the
largest global batch that fits (a search by compiling), and an *estimated* step time and
training cost: the project's FLOPs per step (bigmodel.flops) over chips x the chip's dense
bf16 peak at an assumed MFU. Those estimates are assumptions, not measurements.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tempfile

from bigmodel import aot, sharding, topology
from bigmodel.config import ConfigError, Experiment, MeshConfig
from bigmodel.train.loop import Components
from bigmodel.train.state import param_count

log = logging.getLogger(__name__)

EXIT_DOES_NOT_FIT = 3


@dataclasses.dataclass(frozen=True)
class Estimate:
  """The assumptions of the cost estimate."""
  mfu: float = 0.5
  train_tokens: float = 0.0
  chip_hour_usd: float = 0.0


def _components(exp: Experiment, mesh, batch: int) -> Components:
  exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, batch_size=batch))
  return Components.build(exp, mesh)


def _fit(comp: Components, which: str, hbm: int, headroom: float, dump_dir=None) -> dict:
  """{compile_s, memory, bytes, fits}: the TPU compiler's refusal counts as not fitting."""
  try:
    r = aot.compile_step(comp, which, dump_dir)
  except aot.DoesNotFit as e:
    log.info("%s step at batch %d does not fit: %s", which, comp.exp.train.batch_size, e)
    return {"compile_s": None, "memory": {}, "bytes": e.required, "fits": False, "error": str(e)}
  total = r["memory"]["total_bytes_per_device"]
  return {**r, "bytes": total, "fits": total <= hbm * (1 - headroom)}


def find_max_batch(exp: Experiment, mesh, hbm: int, headroom: float, first: dict,
                   max_compiles: int = 4) -> tuple[int, int, bool]:
  """(largest global batch compiled that fits, compiles used, whether the next larger batch
  was seen not to fit).

  Per-chip bytes are close to linear in the batch (arguments stay, activations grow), so each
  next batch to try is where the line through the last two compiles (at first the arguments
  plus temporaries proportional to the batch, from `first`, the report's own compile) meets
  the limit, in units of data-parallel ways x microbatches, kept inside the bracket found so
  far; bisection when the line says nothing new. Every answer is a batch that compiled and fit."""
  unit = sharding.batch_size_per(mesh) * exp.train.microbatches
  limit = hbm * (1 - headroom)
  b0 = exp.train.batch_size
  points = [(b0 // unit, first["bytes"])] if first["bytes"] else []
  lo, hi = (b0 // unit, None) if first["fits"] else (0, b0 // unit)
  if first["fits"] and first["memory"]:
    m = first["memory"]
    fixed = m["argument_size_in_bytes"] + m["output_size_in_bytes"] - m["alias_size_in_bytes"]
    points.insert(0, (0, fixed))
  used = 0
  while used < max_compiles and (hi is None or hi - lo > 1):
    guess = None
    if len(points) >= 2 and points[-1][0] != points[-2][0]:
      (k1, y1), (k2, y2) = points[-2], points[-1]
      slope = (y2 - y1) / (k2 - k1)
      guess = int(k2 + (limit - y2) / slope) if slope > 0 else None
    top = hi - 1 if hi is not None else None
    if guess is None or guess <= lo or (top is not None and guess > top):
      guess = max(1, 2 * lo) if hi is None else (lo + hi) // 2
    if top is not None:
      guess = min(guess, top)
    guess = max(guess, lo + 1)
    used += 1
    r = _fit(_components(exp, mesh, guess * unit), "train", hbm, headroom)
    if r["bytes"]:
      points.append((guess, r["bytes"]))
    lo, hi = (guess, hi) if r["fits"] else (lo, guess)
  return lo * unit, used, hi is not None and hi - lo == 1


def predicted_max_batch(exp: Experiment, mesh, memory: dict, limit: float) -> int:
  """The largest batch by a straight line from one compile: arguments and outputs stay, the
  temporaries grow in proportion to the batch (an estimate, slightly high when some
  temporaries are the size of the params); rounded down to data-parallel ways x microbatches,
  and never below the compiled batch when that fits (tiny models: the line's rounding said 0)."""
  unit = sharding.batch_size_per(mesh) * exp.train.microbatches
  fixed = memory["argument_size_in_bytes"] + memory["output_size_in_bytes"] - memory["alias_size_in_bytes"]
  per_unit = memory["temp_size_in_bytes"] / (exp.train.batch_size / unit)
  line = int((limit - fixed) // per_unit) * unit if per_unit > 0 and limit > fixed else 0
  fits = fixed + memory["temp_size_in_bytes"] <= limit
  return max(line, exp.train.batch_size) if fits else line


def _round_batch(exp: Experiment, mesh) -> tuple[Experiment, int | None]:
  """(exp with its global batch rounded up to a multiple of data-parallel ways x microbatches,
  the recipe's batch when that changed it, else None): a recipe written for a few devices
  still compiles for a slice, and the report says so."""
  unit = sharding.batch_size_per(mesh) * exp.train.microbatches
  batch = exp.train.batch_size
  if batch % unit == 0:
    return exp, None
  rounded = -(-batch // unit) * unit
  log.warning("global batch %d rounded up to %d, the next multiple of the mesh's %d data-parallel "
              "ways x %d microbatches", batch, rounded, sharding.batch_size_per(mesh),
              exp.train.microbatches)
  return dataclasses.replace(exp, train=dataclasses.replace(exp.train, batch_size=rounded)), batch


def report(exp: Experiment, topo_name: str, mesh_cfg: MeshConfig | None = None, *,
           estimate: Estimate = Estimate(), headroom: float = 0.05, max_batch: bool = False,
           largest: int = 0, max_compiles: int = 4, skip_eval: bool = False) -> dict:
  """Compiles exp's train and eval steps for the slice; the report as a flat dict."""
  topo = topology.parse(topo_name)
  devices = topology.topology_devices(topo)
  mesh = topology.make_mesh(mesh_cfg or exp.mesh, devices)
  exp, adjusted_from = _round_batch(exp, mesh)
  comp = Components.build(exp, mesh)
  hbm = topo.chip.hbm_bytes
  with tempfile.TemporaryDirectory() as dump:
    train = _fit(comp, "train", hbm, headroom, dump if largest else None)
    buffers = aot.largest_buffers(dump, largest) if largest and train["memory"] else []
  evals = ({"bytes": None, "fits": True, "compile_s": None} if skip_eval else
           _fit(comp, "eval", hbm, headroom))
  batch, seq = exp.train.batch_size, exp.data.seq_len
  flops_per_step = comp.flops_per_token() * batch * seq
  peak = topo.chip.bf16_peak_flops
  step_s = flops_per_step / (topo.chips * peak * estimate.mfu)
  r = {"topology": topo.name, "libtpu_topology": topo.libtpu_topology, "chip": topo.chip.generation,
       "chips": topo.chips, "mesh": dict(mesh.shape), "params": param_count(comp.abstract.params),
       "batch": batch, "microbatches": exp.train.microbatches, "seq_len": seq,
       "remat": exp.model.remat, "bytes_per_device": train["bytes"], "memory": train["memory"],
       **{f"{name}_bytes": train["memory"].get(f"{field}_size_in_bytes") for name, field in
          (("arguments", "argument"), ("outputs", "output"), ("temporaries", "temp"),
           ("aliased", "alias"))},
       "eval_bytes_per_device": evals["bytes"], "hbm_bytes_per_chip": hbm, "headroom": headroom,
       "fits": bool(train["fits"] and evals["fits"]), "flops_per_step": flops_per_step,
       "peak_flops_per_chip": peak, "peak_source": topo.chip.source,
       "assumed_mfu": estimate.mfu, "est_step_s": step_s,
       "est_tokens_per_sec_per_chip": batch * seq / step_s / topo.chips,
       "compile_s": train["compile_s"], "eval_compile_s": evals["compile_s"]}
  if adjusted_from is not None:
    r["batch_adjusted_from"] = adjusted_from
  if "error" in train or "error" in evals:
    r["compiler_error"] = train.get("error") or evals.get("error")
  if buffers:
    r["largest_buffers"] = buffers
  if train["memory"]:
    r["predicted_max_batch"] = predicted_max_batch(exp, mesh, train["memory"], hbm * (1 - headroom))
  if max_batch:
    r["max_batch_that_fits"], r["max_batch_compiles"], r["max_batch_exact"] = find_max_batch(
        exp, mesh, hbm, headroom, train, max_compiles)
  if estimate.train_tokens:
    chip_s = estimate.train_tokens * comp.flops_per_token() / (peak * estimate.mfu)
    r["train_tokens"] = estimate.train_tokens
    r["chip_hours"] = chip_s / 3600
    r["wall_hours"] = chip_s / 3600 / topo.chips
    if estimate.chip_hour_usd:
      r["chip_hour_usd"] = estimate.chip_hour_usd
      r["cost_usd"] = r["chip_hours"] * estimate.chip_hour_usd
  return r


def format_report(r: dict) -> str:
  gib = lambda b: "?" if b is None else f"{b / 2**30:.2f} GiB"
  m = r["memory"]
  lines = [f"{r['topology']} ({r['libtpu_topology']}, {r['chips']} chips of {gib(r['hbm_bytes_per_chip'])} "
           f"HBM): mesh {r['mesh']}, {r['params']:,} params, batch {r['batch']} x seq {r['seq_len']}"
           f" (microbatches {r['microbatches']}, remat {r['remat']})"]
  if "batch_adjusted_from" in r:
    lines.append(f"global batch {r['batch']}: the recipe's {r['batch_adjusted_from']} rounded up to "
                 f"a multiple of the mesh's data-parallel ways x microbatches")
  if m:
    lines.append(f"train step per chip: total {gib(r['bytes_per_device'])} = arguments "
                 f"{gib(m['argument_size_in_bytes'])} + outputs {gib(m['output_size_in_bytes'])} + "
                 f"temporaries {gib(m['temp_size_in_bytes'])} - aliased {gib(m['alias_size_in_bytes'])}"
                 f"; compiled in {r['compile_s']:.1f}s")
  else:
    lines.append(f"train step per chip: the TPU compiler refused it: {r.get('compiler_error')}")
  if r["eval_compile_s"] or r["eval_bytes_per_device"]:
    lines.append(f"eval step per chip: {gib(r['eval_bytes_per_device'])}"
                 + (f"; compiled in {r['eval_compile_s']:.1f}s" if r["eval_compile_s"] else ""))
  else:
    lines.append("eval step: not compiled (--skip_eval)")
  lines.append(f"fits: {'yes' if r['fits'] else 'NO'} (limit {1 - r['headroom']:.0%} of "
               f"{gib(r['hbm_bytes_per_chip'])}, leaving headroom for the runtime)")
  for b in r.get("largest_buffers", []):
    lines.append(f"  buffer {gib(b['bytes'])} ({b['values']} values): {b['shapes']}")
  if "predicted_max_batch" in r:
    lines.append(f"largest global batch by a straight line from this compile (an estimate): "
                 f"{r['predicted_max_batch']}")
  if "max_batch_that_fits" in r:
    bound = "" if r["max_batch_exact"] else " (a lower bound: the search budget ran out)"
    lines.append(f"largest global batch that fits: {r['max_batch_that_fits']}{bound} "
                 f"({r['max_batch_compiles']} more compiles)")
  lines.append(f"ESTIMATE (assumed MFU {r['assumed_mfu']:.0%} of {r['peak_flops_per_chip'] / 1e12:.0f} "
               f"TFLOP/s bf16 per chip, {r['peak_source']}): {r['flops_per_step']:.3g} FLOPs/step -> "
               f"{r['est_step_s']:.3f} s/step, {r['est_tokens_per_sec_per_chip']:,.0f} tokens/s/chip")
  if "chip_hours" in r:
    cost = f", ${r['cost_usd']:,.0f} at ${r['chip_hour_usd']}/chip-hour" if "cost_usd" in r else ""
    lines.append(f"ESTIMATE for {r['train_tokens']:.3g} tokens: {r['chip_hours']:,.0f} chip-hours, "
                 f"{r['wall_hours']:,.1f} hours on {r['chips']} chips{cost}")
  return "\n".join(lines)


def table_cells(r: dict) -> tuple[str, str]:
  """(mesh, compile seconds): two cells of a report's row in the launch/ markdown tables
  (launch/pod_table.py, launch/compile_recipes.py). The mesh's axes of more than one way
  (`data64`, `fsdp4xtensor2`; "1" on one device); the train step's compile seconds ("refused":
  the TPU compiler refused it), "+ the eval step's" when that was compiled."""
  mesh = "x".join(f"{k}{v}" for k, v in r["mesh"].items() if v > 1) or "1"
  compile_s = f"{r['compile_s']:.0f}" if r["compile_s"] else "refused"
  compile_s += f" + {r['eval_compile_s']:.0f}" if r.get("eval_compile_s") else ""
  return mesh, compile_s


def json_summary(r: dict) -> dict:
  """The last line's object: everything but the nested details."""
  return {k: v for k, v in r.items() if k not in ("memory", "largest_buffers")}


def check_estimate(e: Estimate) -> None:
  if not 0 < e.mfu <= 1:
    raise ConfigError(f"--mfu {e.mfu}: expected a fraction in (0, 1], e.g. 0.5")
  if e.train_tokens < 0 or e.chip_hour_usd < 0 or (e.chip_hour_usd and not e.train_tokens):
    raise ConfigError("--chip_hour_usd needs --train_tokens N (tokens to train on); both >= 0")
  if not math.isfinite(e.train_tokens):
    raise ConfigError("--train_tokens must be finite")
