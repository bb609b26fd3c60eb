"""Knowledge distillation (Hinton et al. 2015) of a fine-tuned classifier into a student.

    TrainConfig.objective = 'distill'
    DistillConfig.teacher = 'out/sst2'        # a fine-tuned (or quantized) classification workdir
    DistillConfig.temperature = 2.0
    DistillConfig.alpha = 0.5                 # weight of the soft loss; 1 - alpha: hard labels

The student is an `encoder_classifier` of any size (e.g. `sizes/bert_tiny.gin`) on the
teacher's tokenizer and task data. Per example, with student logits s, teacher logits t and
the label y:

    loss = alpha * T^2 * KL(softmax(t / T) || softmax(s / T)) + (1 - alpha) * CE(s, y)

KL is the soft cross-entropy minus the teacher's entropy (a constant): the same gradient, and
0 when the student matches. T^2 keeps the soft term's gradient on the scale of the hard one
as T changes (Hinton et al., section 2).

The teacher's logits are computed in the input pipeline: `build_data` restores the teacher
once and each train and eval batch gains `teacher_logits` [b, c] from one jitted forward of
the teacher (deterministic), so the train step stays a function of the student's params.
Evaluation, predict and quantization of the student read it as a `classification` run.
"""

from __future__ import annotations

import dataclasses
import logging

import gin
import jax
import jax.numpy as jnp
import numpy as np
import optax

from bigmodel.config import ConfigError
from bigmodel.objectives import classification

log = logging.getLogger(__name__)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DistillConfig:
  teacher: str = ""            # the teacher's workdir (config.gin + checkpoints, or quantized)
  temperature: float = 2.0     # T: softens both distributions
  alpha: float = 0.5           # soft-loss weight; 1 - alpha on the hard labels

  def __post_init__(self):
    if self.temperature <= 0:
      raise ConfigError(f"DistillConfig.temperature must be > 0, got {self.temperature}")
    if not 0.0 <= self.alpha <= 1.0:
      raise ConfigError(f"DistillConfig.alpha must be in [0, 1], got {self.alpha}")


def distill_terms(student, teacher, labels, temperature: float, alpha: float):
  """(per-example loss [b], per-example KL [b]) of the formula above; logits [b, c] float32."""
  t = temperature
  log_p_t = jax.nn.log_softmax(teacher / t, axis=-1)
  log_p_s = jax.nn.log_softmax(student / t, axis=-1)
  kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
  hard = optax.softmax_cross_entropy_with_integer_labels(student, labels)
  return alpha * t * t * kl + (1.0 - alpha) * hard, kl


def distill_loss(model, params, batch, *, deterministic=True, rngs=None):
  if "teacher_logits" not in batch:
    raise ValueError("a distill batch needs `teacher_logits`: build it with "
                     "bigmodel.objectives.distill.build_data")
  cfg = DistillConfig()
  logits = model.apply({"params": params}, *classification.model_args(batch),
                       deterministic=deterministic, rngs=rngs).astype(jnp.float32)
  loss, kl = distill_terms(logits, batch["teacher_logits"].astype(jnp.float32), batch["labels"],
                           cfg.temperature, cfg.alpha)
  w = batch["weights"].astype(jnp.float32)
  correct = jnp.sum((jnp.argmax(logits, -1) == batch["labels"]).astype(jnp.float32) * w)
  return jnp.sum(loss * w), {"weight": jnp.sum(w), "correct": correct, "kl_sum": jnp.sum(kl * w)}


def summarize(sums: dict) -> dict:
  out = classification.summarize(sums)
  if "kl_sum" in sums:
    out["kl"] = float(sums["kl_sum"]) / max(float(sums["weight"]), 1.0)
  return out


def load_teacher(workdir: str):
  """(teacher forward: numpy batch -> logits [b, c] float32, its class count).

  The teacher's config.gin is parsed with gin, which holds one global config: the student's
  bindings are put back afterwards."""
  from bigmodel import config as config_lib, storage
  from bigmodel.train import loop
  if not workdir:
    raise ConfigError("objective 'distill' needs DistillConfig.teacher: a fine-tuned "
                      "classification workdir")
  saved = gin.config_str()
  try:
    texp = config_lib.load([storage.join(workdir, "config.gin")])
  finally:
    gin.clear_config()
    gin.parse_config(saved)
  if texp.train.objective not in ("classification", "distill"):
    raise ConfigError(f"the teacher {workdir} is a {texp.train.objective!r} run: distill needs a "
                      f"sequence classifier (objective 'classification')")
  comp, params, _, step = loop.restore_for_inference(workdir, texp)
  log.info("teacher %s (step %d, %d classes)", workdir, step, texp.task.num_classes)
  apply = jax.jit(lambda p, ids, seg, mask: comp.model.apply({"params": p}, ids, seg, mask,
                                                             deterministic=True))

  def forward(batch: dict) -> np.ndarray:
    return np.asarray(apply(params, batch["input_ids"], batch["segment_ids"],
                            batch["input_mask"]), np.float32)
  return forward, texp.task.num_classes


class _Batches:
  """A tf.data dataset's numpy batches, each with the teacher's logits added."""

  def __init__(self, ds, forward):
    self.ds, self.forward = ds, forward

  def as_numpy_iterator(self):
    for batch in self.ds.as_numpy_iterator():
      yield {**batch, "teacher_logits": self.forward(batch)}


class DistillData:
  """The task's ClassificationData with `teacher_logits` on every train and eval batch."""

  def __init__(self, data, forward):
    self.data, self.forward, self.tokenizer = data, forward, data.tokenizer

  def __getattr__(self, name):
    return getattr(self.data, name)

  def train_batches(self, *args, **kwargs):
    return _Batches(self.data.train_batches(*args, **kwargs), self.forward)

  def eval_batches(self, *args, **kwargs):
    return _Batches(self.data.eval_batches(*args, **kwargs), self.forward)


def example_batch(batch_size: int, seq_len: int) -> dict:
  """A classification batch plus the teacher's logits [b, classes] (the task's NUM_CLASSES;
  2 while it is left to the labels), the shapes `compile` and the train state are built on."""
  classes = classification.ClassificationConfig().num_classes or 2
  return {**classification.example_batch(batch_size, seq_len),
          "teacher_logits": jnp.zeros((batch_size, classes), jnp.float32)}


def build_data(cfg, tokenizer=None) -> DistillData:
  data = classification.build_data(cfg, tokenizer)
  forward, classes = load_teacher(DistillConfig().teacher)
  labels = getattr(data, "labels", None)
  n = len(labels.names) if labels is not None and hasattr(labels, "names") else classes
  if n != classes:
    raise ConfigError(f"the task has {n} labels but the teacher {classes} classes")
  return DistillData(data, forward)
