"""The training loop's bad-step guard: a NaN batch and a loss spike are skipped on device
(params and optimizer state unchanged, counted), with gradient accumulation on; K bad steps in
a row stop the run with a clear message, and no checkpoint holds a non-finite value."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel import sharding
from bigmodel.data import lm as lm_data
from bigmodel.train import bad_steps, checkpoint, loop
from tests.helpers import tiny_experiment

GUARD = {"TrainConfig.spike_window": 4, "TrainConfig.spike_zscore": 4.0,
         "TrainConfig.max_bad_steps": 3, "OptimConfig.learning_rate": 1e-2}


def _host(state):
  return jax.device_get((state.params, state.opt_state.inner))


def _same(a, b) -> bool:
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_nan_and_spike_steps_are_skipped_on_device(text_corpus):
  exp = tiny_experiment(text_corpus, batch=16, **GUARD, **{"TrainConfig.microbatches": 2})
  comp = loop.Components.build(exp, sharding.make_mesh(exp.mesh))
  data = comp.build_data()
  batches = lm_data.global_iterator(data.train_batches(16), sharding.batch_sharding(comp.mesh))
  step = comp.train_step()
  state = comp.init_state(jax.random.key(0))
  for _ in range(12):
    state, m = step(state, next(batches))
  assert int(m["bad_steps"]) == 0 and int(m["bad_run"]) == 0
  good = next(batches)

  before = _host(state)
  state, m = step(state, {**good, "weights": good["weights"] * jnp.nan})      # a NaN batch
  assert not np.isfinite(float(m["loss"]))
  assert (int(m["bad_steps"]), int(m["bad_run"]), int(m["bad_reason"])) == (1, 1, bad_steps.NONFINITE)
  assert _same(before, _host(state)) and int(state.step) == 13

  spike = {**good, "targets": jnp.full_like(good["targets"], 256)}   # a byte never in the text
  state, m = step(state, spike)
  assert np.isfinite(float(m["loss"]))
  assert (int(m["bad_steps"]), int(m["bad_run"]), int(m["bad_reason"])) == (2, 2, bad_steps.SPIKE)
  assert _same(before, _host(state))
  window = jax.device_get(state.opt_state.losses)
  assert float(m["loss"]) > window.mean() + 4 * window.std()

  state, m = step(state, good)                                        # a good step: applied
  assert (int(m["bad_steps"]), int(m["bad_run"])) == (2, 0)
  assert not _same(before, _host(state))


def test_bad_steps_in_a_row_stop_the_run_with_finite_checkpoints(text_corpus, tmp_path, monkeypatch):
  real = loop.device_batches

  def poisoned(run, size=2):     # every batch from step 5 on has NaN weights
    for step, batch in enumerate(real(run, size), start=run.start + 1):
      yield {**batch, "weights": batch["weights"] * jnp.nan} if step >= 5 else batch

  monkeypatch.setattr(loop, "device_batches", poisoned)
  exp = tiny_experiment(text_corpus, steps=20, **GUARD, **{"TrainConfig.checkpoint_every": 2})
  with pytest.raises(loop.TrainingError, match=r"step 7: 3 bad steps in a row, the last one a "
                     r"non-finite loss or gradient \(3 skipped"):
    loop.train(exp, str(tmp_path))
  ckpt = checkpoint.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  try:
    assert ckpt.manager.all_steps() == [2, 4, 6]    # none after the guard latched
    comp = loop.Components.build(exp, sharding.make_mesh(exp.mesh))
    at4, _ = ckpt.restore(4, comp.abstract)
    at6, _ = ckpt.restore(6, comp.abstract)
  finally:
    ckpt.close()
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(at6)))
  assert _same(_host(at4), _host(at6))           # steps 5 and 6 changed nothing
  assert int(at6.opt_state.bad_total) == 2


def test_first_update_with_warmup_moves_nothing():
  """The schedule's documented choice (optim.schedule): lr(0) = 0 with warmup, so update 0
  only feeds Adam's moments; without warmup update 0 uses the peak rate."""
  from bigmodel import optim
  from bigmodel.config import OptimConfig
  params = {"w": jnp.ones((4, 4)), "b": jnp.ones(4)}
  grads = {"w": jnp.full((4, 4), 0.5), "b": jnp.full(4, -0.5)}
  moved = lambda updates: [bool(np.abs(u).max() > 0) for u in jax.tree.leaves(updates)]
  for warmup, first in ((10, [False, False]), (0, [True, True])):
    tx, _ = optim.make(OptimConfig(learning_rate=1e-2, warmup_steps=warmup, weight_decay=0.1), 100)
    updates, opt_state = tx.update(grads, tx.init(params), params)
    assert moved(updates) == first
    updates, _ = tx.update(grads, opt_state, params)     # update 1 moves every weight
    assert moved(updates) == [True, True]


def test_loop_bench_pairs_rounds(monkeypatch):
  """`bigmodel bench --loop`'s ratios: per round, loop against step, in wall and CPU time."""
  from bigmodel.train import loop_bench
  figures = {"step": iter([(100.0, 70.0), (90.0, 72.0)]), "loop": iter([(95.0, 72.0), (80.0, 75.0)])}
  monkeypatch.setattr(loop_bench, "variants",
                      lambda exp, bench_exp: {k: lambda s, k=k: next(figures[k]) for k in figures})
  r = loop_bench.measure(None, 1, 2, log=lambda s: None)
  assert r["loop_vs_step_rounds"] == pytest.approx([0.95, 80 / 90])
  assert r["loop_vs_step_cpu_rounds"] == pytest.approx([70 / 72, 72 / 75])
  assert r["step_tokens_per_sec"] == 95.0 and r["loop_cpu_ms_per_step"] == 73.5
