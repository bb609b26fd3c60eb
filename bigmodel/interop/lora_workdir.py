"""LoRA runs out of their workdir: the adapters alone, or merged into a plain workdir.

    bigmodel lora export --workdir W --out A      A/adapters.safetensors + A/lora.json
    bigmodel lora merge --workdir W --out W2      W: a LoRA run (ModelConfig.lora_rank > 0)
    bigmodel lora merge --workdir B --adapters A --out W2     B: the base run, A: an export

`export` writes the adapters of W's latest checkpoint (flat names such as
`blocks/layers/attn/qkv_lora_a`, float32, a few MB where the model is hundreds) and lora.json
(rank, alpha, targets, the step, the base run it started from: TrainConfig.init_checkpoint).

`merge` writes a plain workdir, as `bigmodel train` writes one: config.gin (the run's config
with `ModelConfig.lora_rank = 0`), checkpoints/STEP (the merged params W + (alpha / r) A B and a
fresh optimizer state for that config) and the run's other top-level files (tokenizer, task
files). sample, chat, serve, eval, evaluate, predict, `convert to-hf` and TrainConfig.
init_checkpoint read it like any run. Restoring goes through the model's shardings: the merge
runs on the run's mesh, never on one host's copy of the params.
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from bigmodel import config as config_lib, models, sharding, storage
from bigmodel.config import ConfigError, Experiment
from bigmodel.models import lora
from bigmodel.train import bad_steps, checkpoint, state as state_lib

log = logging.getLogger(__name__)

ADAPTERS, RECORD = "adapters.safetensors", "lora.json"
SKIP = ("config.gin", "metrics.jsonl", "summary.json", "eval_metrics.json")   # not copied by merge


def _layout(exp: Experiment, mesh):
  """(abstract TrainState with shardings, NamedSharding tree) of a run of `exp`."""
  from bigmodel.infer import restore
  if exp.train.objective in restore.DECODER_OBJECTIVES:   # no input pipeline (no TensorFlow)
    model = models.build("decoder", exp.model, mesh)
    tx, _ = bad_steps.make_optimizer(exp)
    z = jax.numpy.zeros((exp.train.batch_size // exp.train.microbatches, exp.data.seq_len),
                        jax.numpy.int32)
    return state_lib.state_shardings(model, tx, (z, z, z + 1), mesh)
  from bigmodel.train import loop
  comp = loop.Components.build(exp, mesh)
  return comp.abstract, comp.state_sh


def load_run(workdir: str) -> tuple[Experiment, str]:
  path = storage.join(workdir, "config.gin")
  if not storage.exists(path):
    raise ConfigError(f"{path} does not exist: name a workdir written by `bigmodel train`")
  text = storage.read_text(path)
  return config_lib.load([], [text]), text


def _restore_params(workdir: str, exp: Experiment, mesh):
  abstract, _ = _layout(exp, mesh)
  state, _, step = checkpoint.restore_workdir(workdir, abstract)
  return state.params, step


def export(workdir: str, out_dir: str) -> dict:
  """Writes the adapters of a LoRA run's latest checkpoint to `out_dir`."""
  from safetensors.numpy import save
  exp, _ = load_run(workdir)
  _need_lora(exp, workdir)
  params, step = _restore_params(workdir, exp, sharding.make_mesh(exp.mesh))
  flat = {k: np.asarray(jax.device_get(v), np.float32)
          for k, v in checkpoint._flat(lora.adapters(params)).items()}
  storage.makedirs(out_dir)
  storage.write_bytes(storage.join(out_dir, ADAPTERS), save(flat))
  record = {"lora_rank": exp.model.lora_rank, "lora_alpha": exp.model.lora_alpha,
            "lora_targets": list(exp.model.lora_targets), "step": step,
            "base": exp.train.init_checkpoint, "run": storage.absolute(workdir),
            "adapter_params": sum(int(a.size) for a in flat.values()), "tensors": len(flat)}
  storage.write_json(storage.join(out_dir, RECORD), record)
  return {**record, "out": storage.absolute(out_dir)}


def _need_lora(exp: Experiment, workdir: str) -> None:
  if not exp.model.lora_rank:
    raise ConfigError(f"{workdir} is not a LoRA run (its ModelConfig.lora_rank is 0); name the "
                      f"workdir of a run trained with ModelConfig.lora_rank > 0, or pass --adapters")


def _read_adapters(adapters_dir: str, base_params) -> tuple[dict, dict]:
  """(nested adapters on the base params' devices, lora.json) of an `export`."""
  from safetensors.numpy import load
  record = storage.read_json(storage.join(adapters_dir, RECORD))
  flat = load(storage.read_bytes(storage.join(adapters_dir, ADAPTERS)))
  base = checkpoint.shapes(base_params)
  nested: dict = {}
  for name, value in flat.items():
    owner = name.rsplit("_lora_", 1)[0]
    if owner not in base:
      raise ConfigError(f"--adapters {adapters_dir}: {name} adapts {owner}, which the base model "
                        f"lacks; merge into the run the adapters were trained on ({record.get('base')})")
    node = nested
    *parents, leaf = name.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return nested, record


def merge(workdir: str, out_dir: str, adapters_dir: str = "") -> dict:
  """Writes the merged plain workdir `out_dir` (see the module docstring)."""
  if storage.exists(storage.join(out_dir, "checkpoints")) and \
      storage.listdir(storage.join(out_dir, "checkpoints")):
    raise checkpoint.CheckpointError(f"{out_dir} already holds checkpoints: choose a new --out")
  exp, text = load_run(workdir)
  mesh = sharding.make_mesh(exp.mesh)
  if adapters_dir:
    if exp.model.lora_rank:
      raise ConfigError(f"--adapters: {workdir} is itself a LoRA run; name its base run")
    params, step = _restore_params(workdir, exp, mesh)
    found, record = _read_adapters(adapters_dir, params)
    params = _with(params, found)
    lora_cfg = exp.model.__class__(**{**_fields(exp.model), "lora_rank": record["lora_rank"],
                                      "lora_alpha": record["lora_alpha"]})
    plain_text = text
  else:
    _need_lora(exp, workdir)
    params, step = _restore_params(workdir, exp, mesh)
    lora_cfg = exp.model
    plain_text = (text + f"\n\n# `bigmodel lora merge`: the LoRA adapters of {workdir} (step "
                  f"{step}) are merged into the weights.\nModelConfig.lora_rank = 0\n")
  plain = config_lib.load([], [plain_text])
  abstract, shardings = _layout(plain, mesh)
  merged = jax.jit(lambda p: lora.merge(p, lora_cfg), out_shardings=shardings.params)(params)
  tx, _ = bad_steps.make_optimizer(plain)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(merged)
  state = state_lib.TrainState(step=jax.numpy.asarray(step, jax.numpy.int32), params=merged,
                               opt_state=opt_state)
  storage.makedirs(out_dir)
  storage.write_text(storage.join(out_dir, "config.gin"), plain_text)
  _copy_files(workdir, out_dir)
  ckpt = checkpoint.Checkpointer(storage.join(out_dir, "checkpoints"), async_save=False)
  ckpt.save(step, state, {"data_step": step, "lora_merged_from": storage.absolute(workdir),
                          "adapters": storage.absolute(adapters_dir) if adapters_dir else ""},
            force=True)
  ckpt.wait()
  ckpt.close()
  return {"step": step, "params": state_lib.param_count(merged),
          "merged_adapter_params": lora.count(lora.adapters(params)),
          "out": storage.absolute(out_dir)}


def _fields(cfg) -> dict:
  import dataclasses
  return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def _with(params, found: dict) -> dict:
  """params with the adapters of `found` added beside their weights."""
  out = dict(params)
  for key, value in found.items():
    out[key] = _with(params[key], value) if isinstance(value, dict) else value
  return out


def _copy_files(src: str, dst: str) -> None:
  """The run's top-level files (tokenizer, task files), not its metrics or config."""
  for name in storage.listdir(src):
    path = storage.join(src, name)
    if name in SKIP or storage.isdir(path) or name.startswith("events."):
      continue
    storage.copy(path, storage.join(dst, name))
