"""Objectives: losses and metrics, nothing else. Models never compute losses.

An objective bundles:
  model         the model family it trains (a key of `bigmodel.models.MODELS`)
  loss_fn       (model, params, batch, deterministic, rngs) -> (summed loss, aux sums incl. "weight");
                the train step divides by the total weight
  summarize     sums (over microbatches or eval batches) -> metrics (means, accuracies)
  model_args    batch -> the positional inputs of `model.apply` (used for init too)
  example_batch (batch_size, seq_len) -> a dummy batch with the shapes and dtypes of real ones
  output_fraction  DataConfig -> the share of positions whose outputs go through the vocabulary
                projection (MFU accounting, bigmodel.flops): 1 for causal LM, 0 for task heads
  build_data    (exp.task_data, tokenizer or None) -> an object with `.tokenizer`,
                `.train_batches(global_batch, start_step, host_rows)` and
                `.eval_batches(global_batch, host_rows)`: tf.data datasets of this host's
                rows (host_rows = (first, count) of each global batch) as numpy dicts,
                a pure function of (seed, step) so that resuming is exact
  config        the task's own gin-configurable config section (a frozen dataclass that lives
                in the objective's module, as seqio registers a task), or None: the Experiment
                carries it as `exp.task`, and the pipeline reads its fields beside DataConfig's
                (`exp.task_data`, config.TaskData)
  head_args     task section -> keyword arguments of the model (a head's classes, pooling)
  resolve       Experiment -> Experiment, before the model is built for training or inference:
                settings that come from the data (classification: NUM_CLASSES from the labels)
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from bigmodel.objectives import bert, classification, lm
from bigmodel.objectives import maths
from bigmodel.objectives import distill
from bigmodel.objectives import prompted_lm
from bigmodel.objectives import qa
from bigmodel.objectives import recsys
from bigmodel.objectives import token_classification


@dataclasses.dataclass(frozen=True)
class Objective:
  model: str
  loss_fn: Callable
  summarize: Callable
  model_args: Callable
  example_batch: Callable
  build_data: Callable
  # DataConfig -> the share of positions projected onto the vocabulary (bigmodel.flops)
  output_fraction: Callable = lambda cfg: 1.0
  config: type | None = None        # the task's config section (MlmConfig, ...), or None
  head_args: Callable = lambda task: {}
  resolve: Callable = lambda exp: exp
  # more sections the objective's own code reads (DistillConfig): `config.load` builds them too,
  # so their bindings count as read and join the run's config.gin
  extra_configs: tuple = ()


def NO_VOCAB_OUTPUT(cfg) -> float:
  """Task heads: no position reaches the vocabulary projection."""
  return 0.0


OBJECTIVES = {
    "causal_lm": Objective("decoder", lm.causal_lm_loss, lm.summarize, lm.model_args,
                           lm.example_batch, lm.build_data),
    "bert_mlm_nsp": Objective("encoder", bert.mlm_nsp_loss, bert.summarize, bert.model_args,
                              bert.example_batch, bert.build_data, bert.output_fraction,
                              bert.MlmConfig),
    "classification": Objective("encoder_classifier", classification.classification_loss,
                                classification.summarize, classification.model_args,
                                classification.example_batch, classification.build_data,
                                NO_VOCAB_OUTPUT, classification.ClassificationConfig,
                                classification.head_args, classification.resolve),
    "prompted_lm": Objective("decoder", prompted_lm.prompted_lm_loss, prompted_lm.summarize,
                             prompted_lm.model_args, prompted_lm.example_batch,
                             prompted_lm.build_data, config=prompted_lm.PromptedConfig),
    "decoder_classification": Objective("decoder_classifier", classification.classification_loss,
                                        classification.summarize, classification.model_args,
                                        classification.example_batch,
                                        classification.build_decoder_data, NO_VOCAB_OUTPUT,
                                        classification.ClassificationConfig,
                                        classification.decoder_head_args,
                                        classification.resolve),
    "qa": Objective("encoder_span", qa.qa_loss, qa.summarize, qa.model_args, qa.example_batch,
                    qa.build_data, NO_VOCAB_OUTPUT, qa.QaConfig),
    "token_classification": Objective("encoder_tagger",
                                      token_classification.token_classification_loss,
                                      classification.summarize,
                                      token_classification.model_args,
                                      token_classification.example_batch,
                                      token_classification.build_data, NO_VOCAB_OUTPUT,
                                      token_classification.NerConfig,
                                      token_classification.head_args),
    # The maths of training (experiments/maths/): answers known in closed form.
    "linear_regression": Objective("linear", maths.linear_regression_loss, maths.summarize,
                                   maths.model_args, maths.example_batch,
                                   maths.build_data("regression"), NO_VOCAB_OUTPUT,
                                   maths.MathsConfig),
    "logistic_regression": Objective("linear", maths.logistic_regression_loss, maths.summarize,
                                     maths.model_args, maths.example_batch,
                                     maths.build_data("logistic"), NO_VOCAB_OUTPUT,
                                     maths.MathsConfig),
    "mlp_regression": Objective("mlp", maths.mlp_regression_loss, maths.summarize,
                                maths.model_args, maths.example_batch, maths.build_data("mlp"),
                                NO_VOCAB_OUTPUT, maths.MathsConfig),
    # recommendation over item ids (bigmodel/data/recsys.py): the catalogue is the vocabulary
    "sasrec": Objective("decoder", recsys.sasrec_loss, recsys.summarize, recsys.sasrec_model_args,
                        recsys.sasrec_example_batch, recsys.build_sasrec_data,
                        config=recsys.RecsysConfig),
    "bert4rec": Objective("item_encoder", recsys.bert4rec_loss, recsys.summarize,
                          recsys.bert4rec_model_args, recsys.bert4rec_example_batch,
                          recsys.build_bert4rec_data, recsys.bert4rec_output_fraction,
                          recsys.RecsysConfig),
}
OBJECTIVES["distill"] = Objective("encoder_classifier", distill.distill_loss, distill.summarize,
                                  classification.model_args, distill.example_batch,
                                  distill.build_data, NO_VOCAB_OUTPUT,
                                  classification.ClassificationConfig, classification.head_args,
                                  classification.resolve, extra_configs=(distill.DistillConfig,))


def get(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
  return OBJECTIVES[name]
