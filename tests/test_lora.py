"""LoRA (bigmodel/models/lora.py): adapters beside the projections, the base frozen, merged
back into a plain workdir (bigmodel/interop/lora_workdir.py)."""

from __future__ import annotations

import functools
import types

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from bigmodel import config, models, sharding
from bigmodel.models import lora
from bigmodel.train import checkpoint, loop
from tests.helpers import decoder_workdir, run_main, tiny_bindings

LORA = ["ModelConfig.lora_rank = 4", "ModelConfig.lora_alpha = 8.0"]
LLAMA_KW = {"ModelConfig.mlp": "swiglu", "ModelConfig.positions": "rope",
            "ModelConfig.norm": "rmsnorm", "ModelConfig.use_bias": False}
LLAMA_ISH = [f"{k} = {v!r}" for k, v in LLAMA_KW.items()]


def _exp(*extra):
  gin.clear_config()
  return config.load([], tiny_bindings("unused.txt", steps=4, **{"OptimConfig.learning_rate": 1e-2})
                     + LLAMA_ISH + list(extra))


def _tokens(seed=0, b=8, s=16):
  return jax.random.randint(jax.random.key(seed), (b, s), 1, 257, jnp.int32)


def _batch(seed):
  x = _tokens(seed)
  return {"inputs": x, "targets": jnp.roll(x, -1, axis=1),
          "positions": jnp.broadcast_to(jnp.arange(16), x.shape), "segment_ids": jnp.ones_like(x),
          "weights": jnp.ones(x.shape, jnp.float32)}


@functools.lru_cache(maxsize=None)
def _forward(model_cfg):
  model = models.build("decoder", model_cfg)
  return jax.jit(lambda p, t: model.apply({"params": p}, t))


def _logits(exp, params, tokens):
  return np.asarray(_forward(exp.model)(params, tokens))


def _init(exp):
  model = models.build("decoder", exp.model)
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), _tokens())["params"])


def _host(tree):
  return jax.tree.map(lambda a: np.asarray(jax.device_get(a)), tree)


def _bitwise_equal(a, b) -> bool:
  return (jax.tree.structure(a) == jax.tree.structure(b) and
          all(x.dtype == y.dtype and x.tobytes() == y.tobytes()
              for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def test_rank_0_is_the_plain_model_and_fresh_adapters_change_nothing():
  plain, with_lora = _exp(), _exp(*LORA)
  assert plain.model.lora_rank == 0
  p0, pr = _init(plain), _init(with_lora)
  assert not lora.adapters(p0)                                  # no adapter at rank 0
  assert checkpoint.shapes(lora.without_adapters(pr)) == checkpoint.shapes(p0)
  names = set(checkpoint.shapes(lora.adapters(pr)))
  assert names == {f"blocks/layers/{m}/{w}_lora_{x}" for m, ws in
                   (("attn", ("qkv", "out")), ("mlp", ("wi", "wi_gate", "wo"))) for w in ws
                   for x in "ab"}
  shapes = checkpoint.shapes(pr)                                # scanned: a leading layers axis
  assert shapes["blocks/layers/attn/qkv_lora_a"] == (2, 32, 4)
  assert shapes["blocks/layers/attn/qkv_lora_b"] == (2, 4, 3, 4, 8)
  assert shapes["blocks/layers/attn/out_lora_a"] == (2, 4, 8, 4)
  # B starts at zero: the adapted model gives the base model's logits exactly.
  np.testing.assert_array_equal(_logits(with_lora, pr, _tokens(1)),
                                _logits(plain, lora.without_adapters(pr), _tokens(1)))
  with pytest.raises(config.ConfigError, match="lora_targets"):
    _exp(*LORA, "ModelConfig.lora_targets = ['qkv', 'attn']")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
  """A tiny LoRA run started from a base workdir (TrainConfig.init_checkpoint), after 3 train
  steps, saved as `bigmodel train` saves it."""
  from bigmodel.data import tokenizers
  work = tmp_path_factory.mktemp("lora")
  base = decoder_workdir(work / "base", **LLAMA_KW)
  exp = _exp(*LORA, "OptimConfig.warmup_steps = 0", f"TrainConfig.init_checkpoint = '{base}'")
  operative = config.operative_config()
  comp = loop.Components.build(exp, sharding.make_mesh(exp.mesh))
  state = comp.init_state(jax.random.key(1))
  params, _ = loop.load_params(base, comp.abstract.params, state.params)
  start = _host(params)
  state = state.replace(params=params)
  step = comp.train_step()
  for i in range(3):
    state, metrics = step(state, _batch(i))
  assert int(metrics["bad_steps"]) == 0
  run = work / "lora"
  run.mkdir()
  (run / "config.gin").write_text(operative)
  tokenizers.ByteTokenizer().save(str(run))
  ckpt = checkpoint.Checkpointer(str(run / "checkpoints"), async_save=False)
  ckpt.save(3, state, {"data_step": 3}, force=True)
  ckpt.wait()
  ckpt.close()
  return types.SimpleNamespace(exp=exp, base=base, run=str(run), work=work, start=start,
                               after=_host(state.params), opt_state=_host(state.opt_state))


def test_training_moves_only_the_adapters(lora_run):
  r = lora_run
  # init_checkpoint: the base's params, the adapters fresh (B = 0, A random).
  fresh = lora.adapters(r.start)["blocks"]["layers"]["mlp"]
  assert not np.any(fresh["wo_lora_b"]) and np.any(fresh["wo_lora_a"])
  assert _bitwise_equal(lora.without_adapters(r.start), lora.without_adapters(r.after))
  b_after = lora.adapters(r.after)["blocks"]["layers"]["attn"]["qkv_lora_b"]
  assert np.abs(b_after).max() > 1e-3                       # B left zero: the adapters trained
  # The optimizer state: Adam's two moments of the adapters, nothing of the frozen base.
  n_adapters = lora.count(lora.adapters(r.after))
  n_base = lora.count(lora.without_adapters(r.after))
  window = r.exp.train.spike_window
  adapter_shapes = sorted(a.shape for a in jax.tree.leaves(lora.adapters(r.after)))
  moments = sorted(a.shape for a in jax.tree.leaves(r.opt_state) if a.ndim and a.shape != (window,))
  assert moments == sorted(adapter_shapes * 2)
  total = sum(a.size for a in jax.tree.leaves(r.opt_state))
  assert 2 * n_adapters <= total <= 2 * n_adapters + window + 16
  assert total < 0.4 * n_base          # plain AdamW: 2 * (n_base + n_adapters)


def test_merged_weights_equal_base_plus_adapters(lora_run):
  r = lora_run
  merged = lora.merge(r.after, r.exp.model)
  assert checkpoint.shapes(merged) == checkpoint.shapes(lora.without_adapters(r.after))
  tokens = _tokens(5)
  with_adapters = _logits(r.exp, r.after, tokens)
  np.testing.assert_allclose(_logits(_exp(), merged, tokens), with_adapters, rtol=0, atol=1e-6)
  assert np.abs(_logits(_exp(), lora.without_adapters(r.after), tokens) - with_adapters).max() > 1e-4


def test_export_and_merge_write_plain_workdirs(lora_run, capsys):
  """`lora merge` of the LoRA run, and of the base + `lora export`'s adapters: plain workdirs
  that the inference restore (sample, chat, serve) reads, with the LoRA model's logits."""
  from bigmodel.infer import restore
  r, out = lora_run, lora_run.work
  run_main(capsys, "lora", "merge", "--workdir", r.run, "--out", str(out / "merged"))
  run_main(capsys, "lora", "export", "--workdir", r.run, "--out", str(out / "adapters"))
  run_main(capsys, "lora", "merge", "--workdir", r.base, "--adapters", str(out / "adapters"),
           "--out", str(out / "merged2"))
  tokens = _tokens(7)
  want = _logits(r.exp, r.after, tokens)
  for name, step in (("merged", 3), ("merged2", 3)):
    gin.clear_config()
    exp = config.load([str(out / name / "config.gin")])
    assert exp.model.lora_rank == 0
    _, params, tok, step_no = restore.restore_decoder(str(out / name), exp)
    assert step_no == step and tok.vocab_size == 257
    np.testing.assert_allclose(_logits(exp, params, tokens), want, rtol=0, atol=1e-6)
  with pytest.raises(Exception, match="not a LoRA run"):
    from bigmodel.interop import lora_workdir
    lora_workdir.export(r.base, str(out / "nothing"))
  gin.clear_config()
