"""Ahead-of-time compilation of the train and eval steps for a mesh, with memory analysis.

Two targets, the same `Components` (and so the same step) as training:
  - fake CPU devices (`--xla_force_host_platform_device_count`): shardings and per-device
    memory checked on a laptop;
  - a Cloud TPU slice by name (`bigmodel.topology`): the real TPU compiler, through libtpu,
    on a CPU host. Its memory analysis is the TPU program's, and the TPU compiler itself
    refuses a program larger than the HBM it can use (RESOURCE_EXHAUSTED); that figure is
    reported as "does not fit".

Nothing is allocated: the state and batch are abstract (ShapeDtypeStructs with shardings).
Step time and cost are estimates from the project's own FLOPs count (bigmodel.flops) at an
assumed MFU over the chip table's peak, never from XLA's cost analysis (which counts a
scanned layer body once).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import time

import jax

from bigmodel import sharding
from bigmodel.config import Experiment, MeshConfig
from bigmodel.train.loop import Components
from bigmodel.train.state import param_count

FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
          "alias_size_in_bytes", "generated_code_size_in_bytes")
# The inputs that only training reads (data files, the run a fine-tuning starts from): compiling
# binds these recipe macros to placeholders, before the recipe, so that a value given still wins
# and a recipe that leaves them to its user compiles alone. Training still asks for them.
UNREAD_BY_COMPILE = {"INIT_CHECKPOINT": "", "TRAIN_FILE": "", "EVAL_FILE": "", "TARGET_FILE": "",
                     "EVAL_TARGET_FILE": ""}
_UNITS = {"": 1, "B": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


class DoesNotFit(Exception):
  """The TPU compiler refused the program: it needs more HBM than the chip gives it."""

  def __init__(self, message: str):
    super().__init__(message)
    self.required, self.available = _oom_bytes(message)


def _oom_bytes(message: str) -> tuple[int | None, int | None]:
  """(required, available) bytes from the TPU compiler's out-of-memory message."""
  def size(pattern):
    m = re.search(pattern, message)
    return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else None
  num = r"([\d.]+)\s*([KMGT]?)i?B?"
  required = size(r"required[^(]*\(" + num + r"\)") or size(r"Used " + num)
  available = size(r"available HBM \(" + num + r"\)") or size(r"Used [\d.]+[KMGT]?i?B? of " + num)
  return required, available


def memory_of(compiled) -> dict:
  mem = compiled.memory_analysis()
  if mem is None:
    return {}
  memory = {f: int(getattr(mem, f, 0) or 0) for f in FIELDS}
  memory["total_bytes_per_device"] = (memory["argument_size_in_bytes"] + memory["output_size_in_bytes"]
                                      + memory["temp_size_in_bytes"] - memory["alias_size_in_bytes"])
  return memory


def abstract_batch(comp: Components, batch_size: int) -> dict:
  batch_sh = sharding.batch_sharding(comp.mesh)
  return {k: jax.ShapeDtypeStruct((batch_size,) + v.shape[1:], v.dtype, sharding=batch_sh)
          for k, v in comp.example.items()}


def _compile(lowered, dump_dir: str | None):
  options = {"xla_dump_to": dump_dir} if dump_dir else None
  try:
    return lowered.compile(options) if options else lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" in str(e):
      raise DoesNotFit(str(e).splitlines()[0]) from None
    raise


def compile_step(comp: Components, which: str = "train", dump_dir: str | None = None) -> dict:
  """Compiles comp's train or eval step at the config's batch: {compile_s, memory}."""
  batch = abstract_batch(comp, comp.exp.train.batch_size)
  t = time.perf_counter()
  if which == "train":
    lowered = comp.train_step().lower(comp.abstract, batch)
  else:
    lowered = comp.eval_step().lower(comp.abstract.params, batch)
  compiled = _compile(lowered, dump_dir)
  return {"compile_s": time.perf_counter() - t, "memory": memory_of(compiled)}


def compile_train_step(exp: Experiment, mesh_cfg: MeshConfig | None = None, devices=None) -> dict:
  """The fake-device (or given-device) report of the train step."""
  exp = dataclasses.replace(exp, mesh=mesh_cfg or exp.mesh)
  mesh = sharding.make_mesh(exp.mesh, devices)
  comp = Components.build(exp, mesh)
  result = compile_step(comp, "train")
  return {"mesh": dict(mesh.shape), "devices": mesh.size, "params": param_count(comp.abstract.params),
          "batch": exp.train.batch_size, "seq_len": exp.data.seq_len, **result,
          "flops_per_token": comp.flops_per_token()}


def largest_buffers(dump_dir: str, n: int = 8) -> list[dict]:
  """The n largest HBM allocations of the compiled train step, from XLA's memory-usage report
  (size, and the shapes of the values that share each allocation)."""
  reports = sorted(glob.glob(os.path.join(dump_dir, "*train_step*memory-usage-report.txt")) or
                   glob.glob(os.path.join(dump_dir, "*memory-usage-report.txt")), key=os.path.getsize)
  if not reports:
    return []
  rows = []
  with open(reports[-1]) as f:
    text = f.read().split("Memory Space:")[1]      # the default (HBM) space comes first
  for m in re.finditer(r"^\s*\S+\(\s*[\d.]+%\);\s*([\d.]+)([KMGT]?)i?B;\s*\d+;\s*(\d+);\s*(.*)$",
                       text, re.MULTILINE):
    rows.append({"bytes": int(float(m.group(1)) * _UNITS[m.group(2)]), "values": int(m.group(3)),
                 "shapes": m.group(4).strip()[:160]})
  rows.sort(key=lambda r: -r["bytes"])
  return rows[:n]


def format_report(r: dict) -> str:
  gib = lambda b: f"{b / 2**30:.3f} GiB"
  lines = [f"compiled train step: mesh {r['mesh']} ({r['devices']} devices), {r['params']:,} params, "
           f"batch {r['batch']} x seq {r['seq_len']}, in {r['compile_s']:.1f}s"]
  m = r["memory"]
  if m:
    lines.append(f"per-device memory: total {gib(m['total_bytes_per_device'])} = arguments "
                 f"{gib(m['argument_size_in_bytes'])} + outputs {gib(m['output_size_in_bytes'])} + "
                 f"temporaries {gib(m['temp_size_in_bytes'])} - aliased {gib(m['alias_size_in_bytes'])}")
  return "\n".join(lines)
