"""Compiling for Cloud TPU slices on this CPU host (libtpu), CPU-only tuning kept off TPU
programs, and eval in microbatches. The TPU devices come from libtpu without changing jax's
default backend: every other test in this process still runs on the 8 fake CPU devices."""

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding, PartitionSpec as P

from bigmodel import cli, config, pod, sharding, topology
from bigmodel.config import MeshConfig
from bigmodel.models import layers
from bigmodel.models.decoder import Decoder
from bigmodel.train import step as step_lib
from bigmodel.train.loop import Components
from tests.helpers import TINY_MODEL

GPT = ["--gin_file=experiments/gpt_shakespeare_char.gin"]
# (BERT at a smaller batch and length: the TPU compiler's time grows with the shapes)
BERT = ["--gin_file=experiments/bert_wikitext_mlm_nsp.gin", "--gin.BATCH_SIZE=16", "--gin.SEQ_LEN=64"]


def _compile(capsys, args) -> tuple[int, dict, str]:
  capsys.readouterr()
  rc = cli.main(["compile"] + args)
  out = capsys.readouterr()
  lines = out.out.strip().splitlines()
  return rc, (json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}), out.out + out.err


def test_topology_names():
  v5p = topology.parse("v5p-128")
  assert (v5p.chips, v5p.shape, v5p.libtpu_topology) == (64, (4, 4, 4), "v5p:4x4x4")
  assert topology.parse("v4-32").chips == 16 and topology.parse("v5e-16").shape == (4, 4)
  assert topology.parse("v6e-64").chip.bf16_peak_flops == 918e12
  assert jax.default_backend() == "cpu"


def test_slices_are_described_as_booked_torus_links_and_megacore():
  """A slice's wraparound links and chip configuration, as Cloud TPU builds them: whole 4x4x4
  cubes of v4/v5p are 3D tori, v5e/v6e wrap an axis of 16 chips, smaller slices are open; v4
  and v5p chips are megacore."""
  assert topology.parse("v5p-128").wrap == (True, True, True)
  assert topology.parse("v5p-1024").wrap == (True, True, True)
  assert topology.parse("v5p-64").wrap == (False, False, False)        # 2x4x4
  assert topology.parse("v4-32").wrap == (False, False, False)
  assert topology.parse("v5e-256").wrap == (True, True, False)        # 16x16
  assert topology.parse("v6e-128").wrap == (False, True, False)       # 8x16
  assert topology.parse("v5e-16").wrap == (False, False, False)
  assert {c.generation: c.chip_config for c in topology.CHIPS.values()} == {
      "v4": "megacore", "v5p": "megacore", "v5e": "default", "v6e": "default"}


def test_fsdp_weights_are_gathered_by_all_gather_on_a_v5p_128_torus():
  """On v5p-128 (a 4x4x4 torus) the compiled FSDP step gathers each layer's weights with
  all-gathers, as MaxText's does; compiled for an open 4x4x4 mesh (the slice without its
  wraparound links) it gathered them with all-reduces of zero-padded buffers instead, twice the
  bytes on the wire."""
  import re
  from bigmodel import aot
  exp = config.load(["experiments/sizes/llama2_7b.gin", "experiments/runs/pretrain_llama.gin"],
                    ["BATCH_SIZE=64", "SEQ_LEN=128", "ModelConfig.num_layers=2",
                     "ModelConfig.d_model=256", "ModelConfig.num_heads=4", "ModelConfig.d_ff=512",
                     "ModelConfig.vocab_size=512", "TrainConfig.train_steps=1"],
                    defaults=aot.UNREAD_BY_COMPILE)
  mesh = topology.make_mesh(MeshConfig(fsdp=64), topology.topology_devices(topology.parse("v5p-128")))
  comp = Components.build(exp, mesh)
  text = comp.train_step().lower(comp.abstract, aot.abstract_batch(comp, 64)).compile().as_text()
  gathers = [line for line in text.splitlines() if re.search(r" all-gather\(", line)]
  # q/k/v, attention output and the three SwiGLU matrices, in the forward and the rematted
  # backward layer loop
  assert len([g for g in gathers if "/while/body/" in g]) >= 10, len(gathers)
  assert jax.default_backend() == "cpu"


def test_loading_a_topology_leaves_the_environment_as_it_was():
  """libtpu's host-list variable is set only while it loads: left behind, it would make this
  process and its children look like TPU pod workers (bigmodel.distributed)."""
  before = os.environ.get("TPU_WORKER_HOSTNAMES")
  assert len(topology.topology_devices(topology.parse("v5e-8"))) == 8
  assert os.environ.get("TPU_WORKER_HOSTNAMES") == before
  assert jax.default_backend() == "cpu"


@pytest.mark.parametrize("family,args", [("gpt", GPT), ("bert", BERT)])
def test_recipe_compiles_for_v5e_and_v5p(capsys, family, args):
  """One recipe of each family, for a v5e and a v5p slice of 8 chips, with fsdp and tensor;
  fsdp 4 holds half the params and optimizer state per chip that fsdp 2 does."""
  reports = {}
  for topo, mesh in (("v5e-8", "data=2,fsdp=2,tensor=2"), ("v5p-16", "data=1,fsdp=4,tensor=2")):
    extra = [] if (family, topo) == ("gpt", "v5e-8") else ["--skip_eval"]
    rc, r, out = _compile(capsys, args + ["--topology", topo, "--mesh", mesh, "--train_tokens", "1e9",
                                          "--chip_hour_usd", "2"] + extra)
    assert rc == 0 and r["fits"], out
    assert r["chips"] == 8 and r["topology"] == topo and r["mesh"]["tensor"] == 2
    for key in ("params", "batch", "seq_len", "bytes_per_device", "hbm_bytes_per_chip",
                "flops_per_step", "assumed_mfu", "est_step_s", "est_tokens_per_sec_per_chip",
                "compile_s", "chip_hours", "cost_usd"):
      assert key in r, key
    assert 0 < r["bytes_per_device"] < r["hbm_bytes_per_chip"]
    peak = topology.parse(topo).chip.bf16_peak_flops
    assert r["est_step_s"] == pytest.approx(r["flops_per_step"] / (8 * peak * 0.5))
    assert r["cost_usd"] == pytest.approx(2 * r["chip_hours"])
    assert "ESTIMATE" in out and "TPU v5" not in out
    reports[topo] = r
  assert reports["v5e-8"]["hbm_bytes_per_chip"] == 16 * 2 ** 30
  assert reports["v5p-16"]["hbm_bytes_per_chip"] == 95 * 2 ** 30
  if family == "gpt":
    assert 0 < reports["v5e-8"]["eval_bytes_per_device"] < reports["v5e-8"]["bytes_per_device"]
  smaller, larger = reports["v5p-16"]["arguments_bytes"], reports["v5e-8"]["arguments_bytes"]
  assert smaller < 0.8 * larger, (smaller, larger)   # (small tables and the batch stay whole)


def test_far_too_large_for_v5e_8_exits_3(capsys):
  rc, r, out = _compile(capsys, GPT + ["--gin.SEQ_LEN=4096", "--gin.ModelConfig.max_len=4096",
                                       "--gin.BATCH_SIZE=512", "--topology", "v5e-8",
                                       "--mesh", "fsdp=8", "--skip_eval"])
  assert rc == pod.EXIT_DOES_NOT_FIT, out
  assert r["fits"] is False and r["bytes_per_device"] > r["hbm_bytes_per_chip"]
  assert "fits: NO" in out


def test_topology_usage_errors(capsys):
  rc, _, out = _compile(capsys, GPT + ["--topology", "v5x-9"])
  assert rc == 2 and "v5x-9" in out and "v5p-128" in out and "v5e-16" in out
  rc, _, out = _compile(capsys, GPT + ["--topology", "v5e-8", "--mesh", "data=2,fsdp=2,tensor=1"])
  assert rc == 2 and "4 devices" in out and "8 chips" in out
  rc, _, out = _compile(capsys, GPT + ["--topology", "v5e-8", "--mfu", "1.5"])
  assert rc == 2 and "--mfu" in out


def test_without_libtpu_says_how_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "libtpu", None)      # import libtpu -> ImportError
  with pytest.raises(config.ConfigError, match=r"pip install -e '\.\[tpu\]'"):
    topology._devices.__wrapped__("v5e:2x4", "default", (False, False, False))


def _grad_hlo(mesh) -> str:
  """The lowered backward pass of a 2-layer decoder whose model is built for `mesh`."""
  cfg = config.ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=64,
                           max_len=16, scan_layers=False)
  model = Decoder(cfg, mesh)
  rep = NamedSharding(mesh, P())
  tokens = jax.ShapeDtypeStruct((8, 16), jnp.int32, sharding=rep)
  params = nn.meta.unbox(jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((8, 16), jnp.int32)))["params"])
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), params)
  loss = lambda p, t: jnp.sum(model.apply({"params": p}, t) ** 2)
  return jax.jit(jax.grad(loss)).lower(params, tokens).as_text()


def _qkv_layout(mesh) -> str:
  """The shape of the fused q/k/v projection of a decoding Attention built for `mesh`."""
  cfg = config.ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, d_ff=64,
                           max_len=16)
  attn = layers.Attention(cfg, mesh, decode=True)
  x = jnp.zeros((2, 5, 32))
  mask, pos = jnp.ones((2, 1, 5, 5), bool), jnp.zeros((2, 5), jnp.int32)
  text = str(jax.make_jaxpr(lambda x: attn.init(jax.random.key(0), x, mask, pos))(x))
  return "n last" if "f32[2,5,3,4,8]" in text else "n first" if "f32[3,2,5,4,8]" in text else "?"


def test_cpu_tuning_stays_off_tpu_programs():
  tpu = topology.make_mesh(MeshConfig(data=8), topology.topology_devices(topology.parse("v5e-8")))
  cpu = sharding.make_mesh(MeshConfig(data=8))
  assert layers.on_cpu(cpu) and not layers.on_cpu(tpu)
  # the residual-cotangent buffer: one dynamic-update-slice per layer in the backward pass
  assert _grad_hlo(cpu).count("dynamic_update_slice") == 2
  assert _grad_hlo(tpu).count("dynamic_update_slice") == 0
  assert _qkv_layout(cpu) == "n last" and _qkv_layout(tpu) == "n first"


def test_eval_in_microbatches_equals_plain_eval():
  exp = config.load(["experiments/gpt_shakespeare_char.gin"],
                    TINY_MODEL + ["BATCH_SIZE = 16", "SEQ_LEN = 16", "TrainConfig.microbatches = 2"])
  comp = Components.build(exp, sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2)))
  params = comp.init_state(jax.random.key(0)).params
  rng = np.random.default_rng(0)
  batch = {"inputs": rng.integers(0, 64, (16, 16)), "targets": rng.integers(0, 64, (16, 16)),
           "positions": np.tile(np.arange(16), (16, 1)), "segment_ids": np.ones((16, 16), int),
           "weights": (rng.random((16, 16)) > 0.2).astype(np.float32)}
  batch = {k: jnp.asarray(v, comp.example[k].dtype) for k, v in batch.items()}
  split = comp.eval_step()
  plain = step_lib.make_eval_step(comp.model, comp.objective.loss_fn, comp.mesh, comp.state_sh.params)
  got, want = jax.device_get(split(params, batch)), jax.device_get(plain(params, batch))
  assert set(got) == set(want) and "loss_sum" in got
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=2e-6)
  assert "while" in split.lower(params, batch).as_text()   # the microbatch scan


def test_max_batch_search_brackets_the_limit(monkeypatch):
  """The search by compiling, on a stand-in for the compiler whose per-chip bytes are
  1 GiB + 0.3 GiB per row and slightly convex: it ends on the largest batch under the limit."""
  gib = 2 ** 30
  mesh = sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))       # 4 data-parallel ways
  used_bytes = lambda b: int(gib + 0.3 * gib * b + 0.001 * gib * b * b)
  limit = 16 * gib * 0.95
  best = max(b for b in range(4, 400, 4) if used_bytes(b) <= limit)
  calls = []

  def fake_fit(comp, which, hbm, headroom, dump_dir=None):
    b = comp
    calls.append(b)
    return {"bytes": used_bytes(b), "fits": used_bytes(b) <= hbm * (1 - headroom), "memory": {}}

  monkeypatch.setattr(pod, "_components", lambda exp, mesh, b: b)
  monkeypatch.setattr(pod, "_fit", fake_fit)
  exp = config.load(["experiments/gpt_shakespeare_char.gin"], ["BATCH_SIZE = 8"])
  mem = {"argument_size_in_bytes": gib, "output_size_in_bytes": 0, "alias_size_in_bytes": 0,
         "temp_size_in_bytes": used_bytes(8) - gib}
  first = {"bytes": used_bytes(8), "fits": True, "memory": mem}
  found, n, exact = pod.find_max_batch(exp, mesh, 16 * gib, 0.05, first, max_compiles=8)
  assert (found, exact) == (best, True) and n == len(calls) <= 8, (found, best, calls)
  assert all(b % 4 == 0 for b in calls)
  assert pod.predicted_max_batch(exp, mesh, mem, limit) >= best          # the line from one compile
  found, n, exact = pod.find_max_batch(exp, mesh, 16 * gib, 0.05, first, max_compiles=1)
  assert n == 1 and found <= best and used_bytes(found) <= limit


def test_report_rounds_the_batch_up_and_floors_the_estimate(monkeypatch):
  """A recipe batch of 12 on 8 chips compiles at 16 and says so; the straight-line estimate
  of a model with no temporaries to scale (the line said 0) is the batch that compiled and fit."""
  gib = 2 ** 30
  seen = []

  def fake_fit(comp, which, hbm, headroom, dump_dir=None):
    seen.append(comp.exp.train.batch_size)
    mem = {"argument_size_in_bytes": gib, "output_size_in_bytes": 0, "alias_size_in_bytes": 0,
           "temp_size_in_bytes": 0, "total_bytes_per_device": gib}
    return {"compile_s": 1.0, "memory": mem, "bytes": gib, "fits": True}

  monkeypatch.setattr(pod, "_fit", fake_fit)
  exp = config.load(["experiments/gpt_shakespeare_char.gin"], TINY_MODEL + ["BATCH_SIZE = 12"])
  r = pod.report(exp, "v5e-8", MeshConfig(data=1, fsdp=8, tensor=1), skip_eval=True)
  assert seen == [16] and (r["batch"], r["batch_adjusted_from"]) == (16, 12)
  assert r["predicted_max_batch"] == 16
  assert "rounded up" in pod.format_report(r)


def test_every_recipe_loads_alone_for_compile(tmp_path):
  """`bigmodel compile --gin_file=RECIPE` needs nothing that only training reads: the data files
  and the start get placeholders (aot.UNREAD_BY_COMPILE), a *_fast recipe's model its DEFAULTS;
  a start's config.gin passed first still sets the model, and training still asks for a start."""
  from bigmodel import aot
  from bigmodel.train import loop
  sys.path.insert(0, "launch")
  import compile_recipes
  found = compile_recipes.recipes()
  assert len(found) >= 20 and "experiments/finetune/sst2_fast.gin" in found
  for recipe in found:
    exp = config.load([recipe], [], defaults=aot.UNREAD_BY_COMPILE)
    assert exp.model.vocab_size > 0 or exp.train.objective in ("linear_regression",
                                                                  "logistic_regression",
                                                                  "mlp_regression"), recipe
  fast = "experiments/finetune/sst2_fast.gin"
  assert config.load([fast], [], defaults=aot.UNREAD_BY_COMPILE).model.d_model == 384   # MiniLM-L6
  init = tmp_path / "config.gin"
  init.write_text("\n".join(TINY_MODEL) + "\n")
  exp = config.load([str(init), fast], ["INIT_CHECKPOINT = 'x'", "TRAIN_FILE = 't'", "EVAL_FILE = ''"])
  assert (exp.model.d_model, exp.model.vocab_size, exp.model.num_layers) == (32, 64, 2)
  with pytest.raises(config.ConfigError, match="the macro TRAIN_FILE has no value"):
    config.load([fast], ["INIT_CHECKPOINT = 'x'"])                       # training still needs it
  phase2 = config.load(["experiments/bert_wikitext_mlm_nsp_phase2.gin"])
  with pytest.raises(config.ConfigError, match="init_checkpoint has no value.*compile. does not need"):
    loop.train(phase2, str(tmp_path / "w"), "")
  assert not (tmp_path / "w").exists()
  rows = [{"recipe": "a", "rc": 1, "error": "boom"},
          {"recipe": "b", "rc": 0, "mesh": {"data": 64, "fsdp": 1}, "batch": 64, "batch_adjusted_from": 12,
           "seq_len": 64, "params": 8e5, "bytes_per_device": 2**30, "eval_bytes_per_device": None,
           "fits": True, "compile_s": 9.6, "eval_compile_s": None}]
  text = compile_recipes.table(rows)
  assert "| a | FAILED (rc 1): boom |" in text and "| b | 0.80M | data64 | 64 (from 12) | 64 | 1.000 | - | yes | 10 |" in text
