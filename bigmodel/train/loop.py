"""The training entry point, in order: mesh, input, model and optimizer, shardings,
step, restore, loop. Also eval of a finished run.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import jax

from bigmodel import distributed, flops, models, objectives, optim, sharding, storage
from bigmodel.config import ConfigError, Experiment
from bigmodel.data import lm as lm_data
from bigmodel.data import tokenizers
from bigmodel.train import checkpoint, state as state_lib, step as step_lib
from bigmodel.train.metrics import MetricWriter

log = logging.getLogger(__name__)


class TrainingError(RuntimeError):
  pass


@dataclasses.dataclass
class Components:
  """Everything derived from the config and the mesh, before any data or params."""
  exp: Experiment
  mesh: Any
  model: Any
  objective: objectives.Objective
  tx: Any
  lr: Any
  example: dict
  abstract: Any       # abstract TrainState with shardings
  state_sh: Any       # TrainState of NamedShardings

  @classmethod
  def build(cls, exp: Experiment, mesh) -> "Components":
    sharding.check_batch(exp.train.batch_size, mesh, exp.train.microbatches)
    objective = objectives.get(exp.train.objective)
    model = models.build(objective.model, exp.model, mesh)
    tx, lr = optim.make(exp.optim, exp.train.train_steps)
    micro = exp.train.batch_size // exp.train.microbatches
    example = objective.example_batch(micro, exp.data.seq_len)
    abstract, state_sh = state_lib.state_shardings(model, tx, objective.model_args(example), mesh)
    return cls(exp, mesh, model, objective, tx, lr, example, abstract, state_sh)

  def init_state(self, rng):
    return state_lib.init_state(self.model, self.tx, self.objective.model_args(self.example),
                                self.mesh, rng)

  def build_data(self, tokenizer=None):
    return self.objective.build_data(self.exp.data, tokenizer)

  def flops_per_token(self, causal: bool = False) -> float:
    n = state_lib.param_count(self.abstract.params, exclude=("pos_embed",))
    frac, head = self.objective.output_fraction(self.exp.data), None
    if frac < 1.0 and "mlm" in self.abstract.params:    # the MLM transform runs where the output does
      head = state_lib.param_count(self.abstract.params["mlm"]) + \
          self.exp.model.vocab_size * self.exp.model.d_model
    return flops.training_flops_per_token(self.exp.model, n, self.exp.data.seq_len, causal,
                                          frac, head)

  def train_step(self):
    return step_lib.make_train_step(self.model, self.tx, self.lr, self.objective.loss_fn, self.mesh,
                                    self.state_sh, microbatches=self.exp.train.microbatches,
                                    seed=self.exp.train.seed)

  def eval_step(self):
    return step_lib.make_eval_step(self.model, self.objective.loss_fn, self.mesh, self.state_sh.params)


def _check_vocab(exp: Experiment, tokenizer) -> None:
  if tokenizer.vocab_size > exp.model.vocab_size:
    raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but ModelConfig.vocab_size="
                      f"{exp.model.vocab_size}; set ModelConfig.vocab_size >= {tokenizer.vocab_size}")


def _existing_tokenizer(workdir: str):
  try:
    return tokenizers.load(workdir)
  except FileNotFoundError:
    return None


def _init_workdir(path: str) -> str:
  """The workdir named by TrainConfig.init_checkpoint (it may name its checkpoints/ folder)."""
  path = storage.absolute(path.rstrip("/"))
  return storage.dirname(path) if storage.basename(path) == "checkpoints" else path


def load_params(workdir: str, abstract_params, init_params=None) -> tuple[Any, int]:
  """(params of the latest checkpoint of another run, on `abstract_params`' shardings; its step).

  Only the params are read (orbax partial restore): the optimizer state may differ. With
  `init_params` (a fine-tuning start), a task head the checkpoint lacks (top-level names in
  `models.heads.FRESH_PARAMS`) keeps those initial values, and pretraining heads the model
  lacks (mlm, nsp) are left in the checkpoint.
  """
  import orbax.checkpoint as ocp
  directory = storage.join(workdir, "checkpoints")
  if not storage.isdir(directory):
    raise checkpoint.CheckpointError(f"TrainConfig.init_checkpoint: no checkpoints in {directory}; "
                                     f"name the workdir of a finished `bigmodel train` run")
  manager = ocp.CheckpointManager(storage.epath(directory), item_handlers={
      "state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
  try:
    step = manager.latest_step()
    if step is None:
      raise checkpoint.CheckpointError(f"TrainConfig.init_checkpoint: {directory} holds no checkpoint")
    stored = manager.item_metadata(step)["state"]
    stored = stored.get("params", {}) if hasattr(stored, "get") else {}
    got, want = checkpoint.shapes(stored), checkpoint.shapes(abstract_params)
    fresh = {}
    if init_params is not None:   # fine-tuning: a new head starts fresh, unused heads are dropped
      from bigmodel.models.heads import FRESH_PARAMS
      fresh = {k for k in want if k not in got and k.split("/")[0] in FRESH_PARAMS}
      got = {k: v for k, v in got.items() if k in want}
      want = {k: v for k, v in want.items() if k not in fresh}
      if fresh:
        abstract_params = {k: v for k, v in abstract_params.items() if k not in FRESH_PARAMS}
        print(f"init_checkpoint: {len(fresh)} head params start fresh: {sorted(fresh)}", flush=True)
    problems = checkpoint.shape_problems(got, want)
    if problems:
      raise checkpoint.CheckpointError(
          f"TrainConfig.init_checkpoint: the params in {directory} (step {step}) do not match "
          f"this model:\n" + "\n".join(problems) + "\nUse the same ModelConfig (max_len too).")
    item = {"params": abstract_params}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))
  finally:
    manager.close()
  params = restored["state"]["params"]
  if fresh:
    params = {**params, **{k: v for k, v in init_params.items() if k not in params}}
  return params, step


def batch_tokens(batch: dict) -> int:
  """Token positions in a global batch: the largest [b, s] array (rows may be narrower than
  DataConfig.seq_len when a pipeline buckets by length)."""
  sizes = [x.shape[0] * x.shape[1] for x in jax.tree.leaves(batch) if getattr(x, "ndim", 0) >= 2]
  return max(sizes) if sizes else len(jax.tree.leaves(batch)[0])


def evaluate(comp: Components, params, data, eval_step=None) -> dict:
  eval_step = eval_step or comp.eval_step()
  batch_sh = sharding.batch_sharding(comp.mesh)
  sums: dict[str, float] = {}
  host_rows = sharding.host_batch_slice(comp.mesh, comp.exp.train.batch_size)
  for batch in lm_data.global_iterator(data.eval_batches(comp.exp.train.batch_size, host_rows),
                                       batch_sh):
    out = jax.device_get(eval_step(params, batch))
    for k, v in out.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  return comp.objective.summarize(sums)


def train(exp: Experiment, workdir: str, config_str: str = "", allow_changed=()) -> dict:
  """Trains (or resumes) in `workdir`; returns the final figures. `allow_changed`: run
  identity fields (checkpoint.IDENTITY_FIELDS) a resume may change."""
  distributed.maybe_initialize()
  wall_start = time.time()
  tc = exp.train
  # Mesh.
  mesh = sharding.make_mesh(exp.mesh)
  # Model, optimizer and shardings (cheap, abstract: fails fast on bad shapes).
  comp = Components.build(exp, mesh)
  ckpt = checkpoint.Checkpointer(storage.join(workdir, "checkpoints"), tc.keep_checkpoints,
                                 tc.async_checkpoints)
  identity = checkpoint.run_identity(exp)
  restored = checkpoint.resume(ckpt, comp.abstract, identity, allow_changed)
  latest = restored[2] if restored else None
  # Input (a resumed run, or one started from another run's params, keeps that run's tokenizer).
  init_dir = _init_workdir(tc.init_checkpoint) if tc.init_checkpoint and latest is None else None
  data = comp.build_data(_existing_tokenizer(workdir) if latest is not None else
                         _existing_tokenizer(init_dir) if init_dir else None)
  _check_vocab(exp, data.tokenizer)
  # Params: restored, or initialized sharded.
  if latest is not None:
    state, meta, _ = restored
    start = int(state.step)
    if meta.get("data_step", start) != start:
      raise TrainingError(f"checkpoint step {latest}: data position {meta.get('data_step')} != step {start}")
    print(f"resumed from {ckpt.directory} step {start}", flush=True)
  else:
    state = comp.init_state(jax.random.key(tc.seed))
    start = 0
    if init_dir:
      params, init_step = load_params(init_dir, comp.abstract.params, state.params)
      state = state.replace(params=params)
      print(f"initialized params from {init_dir} step {init_step} (TrainConfig.init_checkpoint)",
            flush=True)
  if jax.process_index() == 0:
    storage.makedirs(workdir)
    storage.write_text(storage.join(workdir, "config.gin"), config_str)
    data.tokenizer.save(workdir)
  n_params = state_lib.param_count(state.params)
  fpt = comp.flops_per_token()
  peak = flops.Peak.for_run(tc.peak_flops or None)
  print(f"model: {n_params:,} params, {fpt / 1e6:.2f} MFLOPs/token (PaLM 6N+12LHQT); "
        f"mesh {dict(mesh.shape)}; peak {peak.flops / 1e9:.1f} GFLOP/s ({peak.source})", flush=True)

  train_step, eval_step = comp.train_step(), comp.eval_step()
  writer = MetricWriter(workdir, tc.train_steps)
  batch_sh = sharding.batch_sharding(mesh)
  eval_record: dict = {}

  def run_eval(step):
    nonlocal eval_record
    result = evaluate(comp, state.params, data, eval_step)
    eval_record = {"step": step, "split": "validation", **result}
    writer.write(eval_record)
    if jax.process_index() == 0:
      details = ", ".join(f"{k} {v:.4f}" for k, v in result.items()
                          if k != "loss" and isinstance(v, float))
      print(f"eval step {step}: validation loss {result['loss']:.4f} ({details})", flush=True)

  def save(step, force=False):
    ckpt.save(step, state, {"data_step": step, "seed": exp.data.seed,
                            "examples_seen": step * tc.batch_size, "run": identity}, force=force)

  step = start
  t_last, step_last = time.time(), start
  train_time, timed_steps = 0.0, 0   # excludes the compiling first step, evals and saves
  timed_tokens, pending_tokens = 0, 0   # tokens of the timed steps; of those since t_last
  host_rows = sharding.host_batch_slice(mesh, tc.batch_size)
  batches = lm_data.global_iterator(data.train_batches(tc.batch_size, start, host_rows), batch_sh)
  last_step = min(tc.train_steps, tc.stop_after) if tc.stop_after else tc.train_steps
  try:
    for step in range(start + 1, last_step + 1):
      batch = next(batches)
      state, metrics = train_step(state, batch)
      if step == start + 1:
        jax.block_until_ready(metrics)
        t_last, step_last = time.time(), step
      else:
        pending_tokens += batch_tokens(batch)
      if step % tc.log_every == 0 or step == last_step:
        metrics = jax.device_get(metrics)
        record = {"step": step, "loss": float(metrics["loss"]),
                  "learning_rate": float(metrics["learning_rate"]),
                  "grad_norm": float(metrics["grad_norm"]), "param_norm": float(metrics["param_norm"])}
        if step > step_last:
          now = time.time()
          dt = (now - t_last) / (step - step_last)
          tps = pending_tokens / (now - t_last)
          train_time += now - t_last
          timed_steps += step - step_last
          timed_tokens, pending_tokens = timed_tokens + pending_tokens, 0
          t_last, step_last = now, step
          record.update(step_time=dt, tokens_per_sec=tps, **peak.mfu_fields(tps * fpt))
        record.update(comp.objective.summarize({k[4:]: v for k, v in metrics.items()
                                                if k.startswith("sum/")}))
        record.pop("perplexity", None)
        if not all(math.isfinite(record[k]) for k in ("loss", "grad_norm")):
          raise TrainingError(f"step {step}: loss {record['loss']}, grad norm {record['grad_norm']}"
                              f" is not finite; lower OptimConfig.learning_rate or check the data")
        writer.write(record)
        writer.console(step, record, start)
      if tc.eval_every and step % tc.eval_every == 0 and step != last_step:
        jax.block_until_ready(state.step)
        train_time += time.time() - t_last
        timed_steps += step - step_last
        timed_tokens, pending_tokens = timed_tokens + pending_tokens, 0
        run_eval(step)
        t_last, step_last = time.time(), step
      if tc.checkpoint_every and step % tc.checkpoint_every == 0 and step != last_step:
        save(step)
    if step > start or latest is None:
      save(step, force=True)
    run_eval(step)
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()

  summary = {"step": step, "params": n_params,
             "validation_loss": eval_record.get("loss"),
             "tokens_per_sec": timed_tokens / train_time if train_time else None,
             "mfu": None, "peak_flops": peak.flops, "peak_flops_source": peak.source,
             "wall_time_s": time.time() - wall_start, "train_time_s": train_time}
  if summary["tokens_per_sec"]:
    summary.update(peak.mfu_fields(summary["tokens_per_sec"] * fpt),
                   peak_flops_source=peak.source)
  if tc.sample_len and jax.process_index() == 0:
    from bigmodel.infer import sample as sample_lib
    summary["sample"] = sample_lib.generate(comp.model, state.params, data.tokenizer,
                                            tc.sample_prompt, tc.sample_len, exp.data.seq_len,
                                            temperature=0.8, top_k=0, seed=tc.seed)
  if jax.process_index() == 0:
    storage.write_json(storage.join(workdir, "summary.json"), summary)
  return summary


def restore_for_inference(workdir: str, exp: Experiment):
  """(components, params, tokenizer) of the latest checkpoint in a workdir."""
  mesh = sharding.make_mesh(exp.mesh)
  comp = Components.build(exp, mesh)
  ckpt = checkpoint.Checkpointer(storage.join(workdir, "checkpoints"), async_save=False)
  try:
    restored = ckpt.restore_latest(comp.abstract)   # read-only: unusable steps stay where they are
  finally:
    ckpt.close()
  if restored is None:
    raise checkpoint.CheckpointError(f"no checkpoint in {workdir}/checkpoints: train first")
  state, _, latest = restored
  return comp, state.params, tokenizers.load(workdir), latest


def eval_checkpoint(workdir: str, exp: Experiment) -> dict:
  comp, params, tokenizer, step = restore_for_inference(workdir, exp)
  data = comp.build_data(tokenizer)
  result = evaluate(comp, params, data)
  return {"step": step, **result}
