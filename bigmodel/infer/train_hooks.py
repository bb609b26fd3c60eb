"""Training-loop hooks that generate: the end-of-run sample (TrainConfig.sample_len).

The CLI hands these to `train(..., hooks=...)`; training itself never imports generation.

Several processes: the params are sharded over every process's devices, and the generator is
one jitted program that only process 0 would call, so it would wait forever for the others.
Here every process takes part in gathering the params (`process_allgather`, a collective),
then process 0 generates on its own first device from that host copy. The cost is one full
copy of the params in each host's memory, once, at the end of the run: for a model too large
for that, set TrainConfig.sample_len = 0 and run `bigmodel sample` on the finished workdir.
"""

from __future__ import annotations

import jax
import numpy as np

from bigmodel.infer import sample as sample_lib
from bigmodel.train import hooks


def local_params(model, params):
  """(model, params) that process 0 can run alone: unchanged in a single-process run; in a
  multi-process one, the params gathered from every process onto this host and a model with
  no mesh (every process must call this)."""
  if jax.process_count() == 1:
    return model, params
  from jax.experimental import multihost_utils
  host = multihost_utils.process_allgather(params, tiled=True)
  device = jax.local_devices()[0]
  return model.clone(mesh=None), jax.tree.map(lambda x: jax.device_put(np.asarray(x), device), host)


class SampleAtEnd(hooks.Hook):
  """After training (not after a preemption): TrainConfig.sample_len tokens from
  TrainConfig.sample_prompt, at temperature 0.8, into the summary as "sample"."""

  def end(self, run) -> None:
    tc = run.exp.train
    if not tc.sample_len or run.preempted:
      return
    model, params = local_params(run.comp.model, run.state.params)
    if jax.process_index() != 0:
      return
    run.summary["sample"] = sample_lib.generate(model, params, run.data.tokenizer,
                                                tc.sample_prompt, tc.sample_len,
                                                run.exp.data.seq_len, temperature=0.8, top_k=0,
                                                seed=tc.seed)
