"""int8 inference (bigmodel.quant), distillation (objectives/distill.py), magnitude pruning.

Tiny models only: the quantized model against its float twin (encoder classifier and GPT
decoder, weight_only and dynamic), the quantized workdir through restore and `sample`, the
distillation loss against its hand formula."""

import json
import os

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bigmodel import config, models, quant, quant_bench
from bigmodel.config import ModelConfig
from bigmodel.infer import restore
from tests.helpers import decoder_workdir, run_main

TINY = dict(vocab_size=64, d_model=32, num_layers=2, num_heads=2, d_ff=64, max_len=16,
            dropout=0.0)


def _quantized(model, params, args, mode):
  qmodel = quant.wrap(model, mode)
  return qmodel, quant.quantize_params(params, quant.abstract_params(qmodel, args))


def test_encoder_classifier_int8_agrees_with_float():
  model = models.build("encoder_classifier", ModelConfig(**TINY), num_classes=3)
  ids = jax.random.randint(jax.random.key(1), (8, 16), 1, 64)
  args = (ids, jnp.zeros_like(ids), jnp.ones_like(ids))
  params = model.init(jax.random.key(0), *args)["params"]
  ref = np.asarray(model.apply({"params": params}, *args))
  for mode in quant.MODES:
    qmodel, qparams = _quantized(model, params, args, mode)
    qkv = qparams["blocks"]["layers"]["attn"]["qkv"].array
    assert qkv.qvalue.dtype == jnp.int8 and qkv.scale.shape == (2, 1, 3, 2, 16)  # layer, channel
    assert not isinstance(qparams["embed"]["embedding"], quant.QuantWeight)     # stays float
    assert quant.nbytes(qparams) < 0.5 * quant.nbytes(params)
    fn = jax.jit(lambda p, qmodel=qmodel: qmodel.apply({"params": p}, *args))
    err = np.abs(np.asarray(fn(qparams)) - ref).max()
    assert 0 < err < 0.05 * np.abs(ref).max(), (mode, err)    # not the float model, but close
    # after XLA:CPU's optimizations: dynamic runs int8 x int8 -> int32 dots, weight_only none
    dots = quant_bench.dot_types(fn.lower(qparams).compile().as_text())
    assert (dots.get("s32<-s8,s8", 0) > 0) == (mode == "dynamic"), (mode, dots)
    assert not any("s8" in k for k in dots if k != "s32<-s8,s8"), dots


def test_dynamic_int8_dots_keep_the_activation_first_and_equal_qwix_einsum():
  """quant._einsum_in_order: one dot_general per weight matmul with the activation as its
  first operand (qwix's opt_einsum plan puts the weight first, which XLA:CPU runs ~50x slower
  at MiniLM's shapes), and the same numbers as qwix's einsum."""
  model = models.build("encoder_classifier", ModelConfig(**TINY), num_classes=3)
  ids = jax.random.randint(jax.random.key(1), (8, 16), 1, 64)
  args = (ids, jnp.zeros_like(ids), jnp.ones_like(ids))
  params = model.init(jax.random.key(0), *args)["params"]
  qmodel, qparams = _quantized(model, params, args, "dynamic")
  fn = jax.jit(lambda p: qmodel.apply({"params": p}, *args))
  text = fn.lower(qparams).as_text()
  int8_dots = [line for line in text.splitlines()
               if "stablehlo.dot_general" in line and "xi8>, tensor<" in line]
  # qkv, out, wi, wo (the scanned layer body), the pooler and the classifier
  assert len(int8_dots) == 6, int8_dots
  for line in int8_dots:                           # (tensor<8x...xi8>, weight) -> 8x...
    operands, result = line.split(": (")[1].split(") -> ")
    assert operands.startswith("tensor<8x") and result.startswith("tensor<8x"), line
  # one einsum: the same numbers as qwix's (the whole model differs where a ulp moves an
  # activation across an int8 rounding boundary in the next layer)
  from qwix._src.core import einsum as qeinsum, qarray
  keys = iter(jax.random.split(jax.random.key(2), 16))
  def q(shape, channels):
    x = jax.random.normal(next(keys), shape)
    how = qarray.HowToQuantize(qtype=jnp.int8, channelwise_axes=channels, tiled_axes={})
    return qarray.quantize(x, how)
  for eq, xs, ws, wch in [("bsd,dnhk->bsnhk", (8, 16, 32), (32, 3, 2, 16), [1, 2, 3]),
                          ("bshk,hkd->bsd", (8, 16, 2, 16), (2, 16, 32), [2]),
                          ("...d,df->...f", (8, 32), (32, 3), [1]),
                          # one row (batch-1 decode): computed on two rows on CPU, one kept
                          ("bsd,dnhk->bsnhk", (1, 1, 32), (32, 3, 2, 16), [1, 2, 3]),
                          ("...d,df->...f", (1, 32), (32, 3), [1])]:
    x, w = q(xs, list(range(len(xs) - (2 if eq.startswith("bshk") else 1)))), q(ws, wch)
    got, want = quant._einsum_in_order(eq, x, w), qeinsum.einsum(eq, x, w)
    assert quant._one_row_on_cpu(eq.replace("...", "b"), x) == (xs[0] == 1), eq
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
  ref = np.asarray(model.apply({"params": params}, *args))
  got = np.asarray(fn(qparams))
  assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()


@pytest.fixture(scope="module")
def quantized_workdir(tmp_path_factory):
  base = tmp_path_factory.mktemp("quant")
  work = decoder_workdir(base / "run")
  gin.clear_config()
  exp = config.load([os.path.join(work, "config.gin")])
  out = str(base / "int8")
  return work, exp, out, quant.quantize(work, out, exp, "dynamic")


def test_decoder_workdir_quantizes_and_restores(quantized_workdir):
  work, exp, out, summary = quantized_workdir
  model, params, _, step = restore.restore_decoder(work, exp)
  assert summary["mode"] == "dynamic" and summary["step"] == step
  assert summary["quantized_bytes"] < summary["float_bytes"]
  assert json.load(open(os.path.join(out, quant.RECORD)))["mode"] == "dynamic"
  qmodel, qparams, _, qstep = restore.restore_decoder(out, exp)
  assert qstep == step and isinstance(qparams["blocks"]["layers"]["mlp"]["wi"], quant.QuantWeight)
  ids = jax.random.randint(jax.random.key(2), (8, 16), 1, 200)    # the mesh: 8 devices
  ref = np.asarray(model.apply({"params": params}, ids))
  got = np.asarray(qmodel.apply({"params": qparams}, ids))
  assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
  with pytest.raises(config.ConfigError, match="already quantized"):
    quant.quantize(out, out + "2", exp)


def test_sample_reads_a_quantized_workdir(quantized_workdir, capsys):
  """`bigmodel sample` generates (KV cache, unrolled layers) from the int8 params."""
  text = run_main(capsys, "sample", "--workdir", quantized_workdir[2], "--prompt", "the",
                  "--num_tokens", "4", "--temperature", "0")
  assert text.strip()


# ----------------------------------------------------------------------------- distillation


def test_distill_loss_is_the_hinton_formula_with_t_squared():
  from bigmodel.objectives import distill
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(4, 3)) * 2, rng.normal(size=(4, 3)) * 2
  y = np.array([0, 2, 1, 1])

  def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))
  for temp, alpha in ((1.0, 0.0), (2.0, 0.5), (4.0, 1.0)):
    lt, ls = log_softmax(t / temp), log_softmax(s / temp)
    kl = (np.exp(lt) * (lt - ls)).sum(-1)
    hard = -log_softmax(s)[np.arange(4), y]
    want = alpha * temp ** 2 * kl + (1 - alpha) * hard
    got, got_kl = distill.distill_terms(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), temp, alpha)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got_kl), kl, rtol=1e-5, atol=1e-7)
  # T^2 keeps the soft term on one scale: at high T it tends to the logit matching of
  # Hinton et al. (sec. 2.1), sum((s - t - mean)^2) / (2 N), whatever T is
  d = s - t
  limit = ((d - d.mean(-1, keepdims=True)) ** 2).sum(-1) / (2 * 3)
  for temp in (50.0, 200.0):
    soft, _ = distill.distill_terms(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y), temp, 1.0)
    np.testing.assert_allclose(np.asarray(soft), limit, rtol=0.05)


def test_distill_objective_loss_and_a_descent_step():
  from bigmodel import objectives
  obj = objectives.get("distill")
  model = models.build(obj.model, ModelConfig(**TINY), num_classes=3)
  batch = {k: np.asarray(v) for k, v in obj.example_batch(4, 16).items()}
  batch["input_ids"] = np.asarray(jax.random.randint(jax.random.key(3), (4, 16), 1, 64))
  batch["teacher_logits"] = np.array([[4.0, 0, 0], [0, 4, 0], [0, 0, 4], [4, 0, 0]], np.float32)
  params = model.init(jax.random.key(0), *obj.model_args(batch))["params"]
  gin.clear_config()
  gin.bind_parameter("DistillConfig.temperature", 2.0)
  gin.bind_parameter("DistillConfig.alpha", 1.0)
  try:
    fn = jax.jit(lambda p: obj.loss_fn(model, p, batch))
    loss, grad = jax.jit(jax.value_and_grad(lambda p: fn(p)[0]))(params)
    step = jax.tree.map(lambda p, g: p - 1e-3 * g, params, grad)     # a small descent step
    assert float(fn(step)[0]) < float(loss)
    _, aux = fn(params)
    assert float(aux["weight"]) == 4 and float(aux["kl_sum"]) > 0
    assert abs(float(loss) - 4.0 * float(aux["kl_sum"])) < 1e-3 * float(loss)   # alpha 1: T^2 KL
  finally:
    gin.clear_config()


@pytest.mark.slow
def test_classifier_quantize_evaluate_predict_and_distill_cli(tmp_path_factory, tmp_path, capsys):
  """finetune a tiny classifier, quantize it, evaluate and predict on the int8 copy, and
  distill a student from it: the CLI end to end, in process."""
  from tests import interop_helpers as H
  from tests.test_finetune_classification import RECIPE, _sentiment
  init = H.converted_bert(tmp_path_factory)
  train = _sentiment(tmp_path / "train.tsv", 200, 0)
  dev = _sentiment(tmp_path / "dev.tsv", 40, 1)
  common = ["--gin_file", os.path.join(init, "config.gin"), "--gin_file", RECIPE,
            f"--gin.INIT_CHECKPOINT='{init}'", f"--gin.TRAIN_FILE='{train}'",
            f"--gin.EVAL_FILE='{dev}'", "--gin.ModelConfig.dropout=0.0"]
  teacher, w8, student = (str(tmp_path / n) for n in ("teacher", "w8", "student"))
  run_main(capsys, "finetune", *common, "--gin.TrainConfig.train_steps=60", "--workdir", teacher)
  ref = json.loads(run_main(capsys, "evaluate", "--workdir", teacher))
  out = run_main(capsys, "quantize", "--workdir", teacher, "--out", w8, "--mode", "dynamic")
  assert json.loads(out)["int8_weights"] > 0
  res = json.loads(run_main(capsys, "evaluate", "--workdir", w8))
  assert res["examples"] == 40 and abs(res["accuracy"] - ref["accuracy"]) <= 0.05, (res, ref)
  inp = tmp_path / "in.jsonl"
  inp.write_text('{"sentence": "the dog sat"}\n{"sentence": "a cat is"}\n')
  run_main(capsys, "predict", "--workdir", w8, "--input", str(inp), "--out", str(tmp_path / "p"))
  assert len(open(tmp_path / "p").readlines()) == 2
  run_main(capsys, "finetune", *common, "--gin.TrainConfig.objective='distill'",
           f"--gin.DistillConfig.teacher='{teacher}'", "--gin.DistillConfig.temperature=2.0",
           "--gin.TrainConfig.train_steps=20", "--workdir", student)
  metrics = [json.loads(line) for line in open(os.path.join(student, "metrics.jsonl"))]
  assert any("kl" in m for m in metrics)                 # the distill objective's summary
  assert json.loads(run_main(capsys, "evaluate", "--workdir", student))["examples"] == 40
