"""Ahead-of-time compilation of the train step for a mesh, with its memory analysis.

Runs on fake CPU devices (`--xla_force_host_platform_device_count`): nothing is
allocated, only lowered and compiled, so an experiment's shardings and per-device
memory can be checked on a laptop before it reaches a pod.
"""

from __future__ import annotations

import dataclasses
import time

import jax

from bigmodel import sharding
from bigmodel.config import Experiment, MeshConfig
from bigmodel.train.loop import Components
from bigmodel.train.state import param_count


def compile_train_step(exp: Experiment, mesh_cfg: MeshConfig | None = None) -> dict:
  exp = dataclasses.replace(exp, mesh=mesh_cfg or exp.mesh)
  mesh = sharding.make_mesh(exp.mesh)
  comp = Components.build(exp, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  batch = {k: jax.ShapeDtypeStruct((exp.train.batch_size,) + v.shape[1:], v.dtype, sharding=batch_sh)
           for k, v in comp.example.items()}
  t = time.perf_counter()
  lowered = comp.train_step().lower(comp.abstract, batch)
  compiled = lowered.compile()
  seconds = time.perf_counter() - t
  mem = compiled.memory_analysis()
  fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
            "alias_size_in_bytes", "generated_code_size_in_bytes")
  memory = {f: int(getattr(mem, f, 0) or 0) for f in fields} if mem is not None else {}
  if memory:
    memory["total_bytes_per_device"] = (memory["argument_size_in_bytes"] + memory["output_size_in_bytes"]
                                        + memory["temp_size_in_bytes"] - memory["alias_size_in_bytes"])
  return {"mesh": dict(mesh.shape), "devices": mesh.size, "params": param_count(comp.abstract.params),
          "batch": exp.train.batch_size, "seq_len": exp.data.seq_len, "compile_s": seconds,
          "memory": memory, "flops_per_token": comp.flops_per_token()}


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
