"""The params of a decoder run's latest checkpoint, without the training input pipelines.

`bigmodel.train.loop.restore_for_inference` builds the run's objective, whose module imports
its tf.data pipeline (TensorFlow: 10-25 s before anything else happens). sample, chat and
serve need only the model: this builds the same abstract TrainState from the config (the model,
the optimizer and a zero batch of the LM objectives' three model inputs) and restores into it.
"""

from __future__ import annotations


import jax.numpy as jnp

from bigmodel import models, sharding, storage
from bigmodel.config import ConfigError, Experiment
from bigmodel.data import tokenizers
from bigmodel.train import bad_steps, checkpoint, state as state_lib

DECODER_OBJECTIVES = ("causal_lm", "prompted_lm")


def restore_decoder(workdir: str, exp: Experiment, command: str = "sample"):
  """(model, params, tokenizer, step) of the latest checkpoint in a causal_lm / prompted_lm
  workdir (a ConfigError for any other objective, a CheckpointError with none saved)."""
  if exp.train.objective not in DECODER_OBJECTIVES:
    raise ConfigError(f"{workdir} holds a {exp.train.objective!r} run; `bigmodel {command}` "
                      f"needs a causal_lm or prompted_lm run")
  mesh = sharding.make_mesh(exp.mesh)
  model = models.build("decoder", exp.model, mesh)
  if storage.exists(storage.join(workdir, "quant.json")):   # `bigmodel quantize` output (qwix)
    from bigmodel import quant
    model, params, latest = quant.restore(workdir, model, decoder_args(exp))
    return model, params, tokenizers.load(workdir), latest
  tx, _ = bad_steps.make_optimizer(exp)   # the state `bigmodel train` saved
  abstract, _ = state_lib.state_shardings(model, tx, decoder_args(exp), mesh)
  state, _, latest = checkpoint.restore_workdir(workdir, abstract)
  return model, state.params, tokenizers.load(workdir), latest


def decoder_args(exp: Experiment) -> tuple:
  """A zero batch of the LM objectives' three model inputs: ids, positions, segments."""
  z = jnp.zeros((exp.train.batch_size // exp.train.microbatches, exp.data.seq_len), jnp.int32)
  return z, z, z + 1
