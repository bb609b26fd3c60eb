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
  build_data    (DataConfig, tokenizer or None) -> an object with `.tokenizer`,
                `.train_batches(global_batch, start_step, host_rows)` and
                `.eval_batches(global_batch, host_rows)`: tf.data datasets of this host's
                rows (host_rows = (first, count) of each global batch) as numpy dicts,
                a pure function of (seed, step) so that resuming is exact
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from bigmodel.objectives import bert, classification, lm
from bigmodel.objectives import prompted_lm
from bigmodel.objectives import qa
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


def NO_VOCAB_OUTPUT(cfg) -> float:
  """Task heads: no position reaches the vocabulary projection."""
  return 0.0


OBJECTIVES = {
    "causal_lm": Objective("decoder", lm.causal_lm_loss, lm.summarize, lm.model_args,
                           lm.example_batch, lm.build_data),
    "bert_mlm_nsp": Objective("encoder", bert.mlm_nsp_loss, bert.summarize, bert.model_args,
                              bert.example_batch, bert.build_data, bert.output_fraction),
    "classification": Objective("encoder_classifier", classification.classification_loss,
                                classification.summarize, classification.model_args,
                                classification.example_batch, classification.build_data,
                                NO_VOCAB_OUTPUT),
    "prompted_lm": Objective("decoder", prompted_lm.prompted_lm_loss, prompted_lm.summarize,
                             prompted_lm.model_args, prompted_lm.example_batch,
                             prompted_lm.build_data),
    "decoder_classification": Objective("decoder_classifier", classification.classification_loss,
                                        classification.summarize, classification.model_args,
                                        classification.example_batch,
                                        classification.build_decoder_data, NO_VOCAB_OUTPUT),
    "qa": Objective("encoder_span", qa.qa_loss, qa.summarize, qa.model_args, qa.example_batch,
                    qa.build_data, NO_VOCAB_OUTPUT),
    "token_classification": Objective("encoder_tagger",
                                      token_classification.token_classification_loss,
                                      classification.summarize,
                                      token_classification.model_args,
                                      token_classification.example_batch,
                                      token_classification.build_data, NO_VOCAB_OUTPUT),
}


def get(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}")
  return OBJECTIVES[name]
