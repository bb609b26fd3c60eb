"""Training benchmark: a grid of recipes x model sizes x meshes x batch sizes x sequence lengths.

    bigmodel bench                                   # = make bench: nanoGPT, GPT-2 small, BERT-base, with the baseline
    bigmodel bench --preset nanogpt --preset gpt2_small
    bigmodel bench --recipe experiments/gpt_shakespeare_char.gin --size gpt_nano --size gpt2_small \\
        --mesh data=1 --mesh data=2,fsdp=2,tensor=2 --batch 8,16 --seq 64,256 [--gin.NAME=VALUE ...]
    bigmodel bench --preset nanogpt --profile_steps 3:6     # + a jax.profiler trace (TensorBoard/Perfetto)

Every point of the grid compiles the real train step (the same `Components` as `bigmodel
train`) on random tokens and reports:
  compile_s                 lower + compile of the step
  step_ms                   median step time after warm-up (`--warmup`, then `--rounds` rounds of
                            `--steps` steps; by default as many steps as fill ~1 s per round)
  tokens_per_sec            global, and per device (`tokens_per_sec_per_device`)
  mfu_palm                  6N + 12*L*H*Q*T FLOPs per token (PaLM appendix B) / peak
  mfu_causal                the same with half the attention term (MaxText's causal convention)
  memory_bytes_per_device   arguments + outputs + temporaries - aliased, from XLA's memory analysis
  input_tokens_per_sec      what the real tf.data pipeline delivers (to device arrays), and
  input_headroom            that divided by what the step consumes (goal: >= 10)
  residual_gradient         the widest backward (kLoop) fusion's operand count of the step, and of
                            the same step compiled without `layers.materialize_cotangent`
                            (`--no_residual_check` skips that second compile)
The peak FLOP/s is measured in the same run (an f32 2048^2 matmul on CPU, bf16 8192^2 on
accelerators), before and again after the points, and raised to the best recorded for
this host (`bigmodel.flops.Peak`), unless `--peak_flops` gives a datasheet figure per
device; an MFU above 1 is shown as "n/a (above the peak)". The host (CPU model, usable
cores, devices, jax/torch/transformers versions) and the peak go into results.json (`host`,
and a short `host` in every record) and head the table: ratios depend on the host.

Side-by-side baseline (`--baseline auto`, the default on CPU): Hugging Face transformers on
PyTorch CPU at the same config (`GPT2LMHeadModel`; for encoders `BertForPreTraining` with the
MLM head applied only at the gathered masked positions, as bigmodel and google-research/bert
do), AdamW
(torch's fused CPU kernel) with the run's global-norm clipping, random data, float32,
dropout 0. It is timed in the same process, interleaved round by round with the bigmodel
step so that both see the same machine load; the bigmodel record carries
`ratio_vs_baseline`: the median over rounds of (baseline step time / bigmodel step time)
within the round, i.e. the tokens/s ratio paired round by round; each round's ratio is in
`ratio_vs_baseline_rounds` (how steady the machine was) and the ratio of the two overall
medians in `ratio_of_median_tokens_per_sec`.

On CPU, meshes of more than one device run on fake devices (XLA's host platform device
count, set here before jax loads): this compares layouts, it is not a speed-up. On GPU/TPU
the same command is the multi-device benchmark. Dropout is set to 0 at every point.

Output: `--out` (default out/bench/results.json: one record per point and framework) and a
markdown table beside it (results.md), also printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import statistics
import sys
import time
from typing import Any

SIZES_DIR = "experiments/sizes"
LM_RUN = "experiments/runs/pretrain_lm.gin"

# name -> (gin files, bindings). Bindings override the files; the grid flags override both.
# The CPU points unroll the layers: XLA:CPU runs a scanned stack as a while loop whose body
# slices the stacked params and stacks the residuals for the backward pass, which is slower
# per step than the unrolled layers (README, "Unrolled layers"; `--vary
# "ModelConfig.scan_layers=[True,False]"` shows both).
PRESETS: dict[str, tuple[list[str], list[str]]] = {
    # nanoGPT's CPU Shakespeare configuration (the demo): 4L/4H/128d, seq 64, batch 12, vocab 65.
    "nanogpt": (["experiments/gpt_shakespeare_char.gin"], ["ModelConfig.scan_layers = False"]),
    # GPT-2 small: 12L/12H/768d, vocab 50,304, seq 256, batch 4.
    "gpt2_small": ([f"{SIZES_DIR}/gpt2_small.gin", LM_RUN],
                   ["TRAIN_STEPS = 100", "BATCH_SIZE = 4", "SEQ_LEN = 256",
                    "ModelConfig.scan_layers = False"]),
    # Accelerator points (launch/gpu_bench.sh).
    "gpt2_124m_1024": ([f"{SIZES_DIR}/gpt2_small.gin", LM_RUN],
                       ["TRAIN_STEPS = 100", "BATCH_SIZE = 32", "SEQ_LEN = 1024",
                        "ModelConfig.dtype = 'bfloat16'"]),
    # A ~1.0B-parameter decoder: 20L/2048d/16H, d_ff 8192, vocab 50,304, seq 2048.
    "decoder_1b": ([f"{SIZES_DIR}/gpt2_small.gin", LM_RUN],
                   ["TRAIN_STEPS = 100", "BATCH_SIZE = 8", "SEQ_LEN = 2048",
                    "ModelConfig.d_model = 2048", "ModelConfig.num_layers = 20",
                    "ModelConfig.num_heads = 16", "ModelConfig.max_len = 2048",
                    "ModelConfig.dtype = 'bfloat16'", "ModelConfig.remat = 'dots'"]),
    "bert_large": ([f"{SIZES_DIR}/bert_large.gin", "experiments/runs/pretrain_bert.gin"],
                   ["TRAIN_STEPS = 100", "BATCH_SIZE = 128", "SEQ_LEN = 128",
                    "WARMUP_STEPS = 10", "LEARNING_RATE = 1e-4",
                    "ModelConfig.dtype = 'bfloat16'"]),
    "bert_base": ([f"{SIZES_DIR}/bert_base.gin", "experiments/runs/pretrain_bert.gin"],
                  ["TRAIN_STEPS = 100", "BATCH_SIZE = 8", "SEQ_LEN = 128",
                   "WARMUP_STEPS = 10", "LEARNING_RATE = 1e-4"]),
}
PRESETS["demo"] = PRESETS["nanogpt"]
DEFAULT_PRESETS = ("nanogpt", "gpt2_small", "bert_base")

# Where the input pipeline is measured for a causal-LM point without data of its own.
FALLBACK_TEXT = "tinyshakespeare/input.txt"


# ---------------------------------------------------------------------------------------
# The grid.

@dataclasses.dataclass(frozen=True)
class Point:
  """One benchmark point: gin files + bindings, a mesh spec, optional batch/seq overrides."""
  name: str
  files: tuple[str, ...]
  bindings: tuple[str, ...] = ()
  mesh: str = ""              # "data=2,fsdp=4"; "" = one device on CPU, all devices elsewhere
  batch: int | None = None
  seq: int | None = None


def _split_ints(values: list[str] | None) -> list[int | None]:
  out: list[int | None] = []
  for v in values or []:
    out += [int(x) for x in str(v).split(",") if x.strip()]
  return out or [None]


def size_file(name: str) -> str:
  """`gpt2_small` -> experiments/sizes/gpt2_small.gin (a path is kept as is)."""
  if name.endswith(".gin") or os.sep in name:
    return name
  return os.path.join(SIZES_DIR, f"{name}.gin")


def mesh_devices(spec: str) -> int:
  """Devices a mesh spec needs (0 for "" or a spec with -1: whatever is there)."""
  if not spec:
    return 0
  sizes = [int(p.split("=", 1)[1]) for p in spec.split(",") if "=" in p]
  return 0 if any(s < 0 for s in sizes) else math.prod(sizes)


def parse_vary(spec: str) -> list[str]:
  """`ModelConfig.scan_layers=[True,False]` -> ["ModelConfig.scan_layers = True", ...]."""
  name, sep, values = spec.partition("=")
  values = values.strip()
  if not sep or not (values.startswith("[") and values.endswith("]")) or values == "[]":
    raise argparse.ArgumentTypeError(f"--vary {spec!r}: expected NAME=[v1,v2,...]")
  return [f"{name.strip()} = {v.strip()}" for v in values[1:-1].split(",") if v.strip()]


def expand_grid(bases: list[tuple[str, list[str], list[str]]], sizes: list[str] | None = None,
                meshes: list[str] | None = None, batches: list[int | None] | None = None,
                seqs: list[int | None] | None = None,
                varies: list[list[str]] | None = None) -> list[Point]:
  """The product bases x sizes x meshes x batches x seqs x varies, in that order (the last
  varies fastest).

  bases: (name, gin files, bindings) of presets or recipes. A size appends its
  experiments/sizes file after the base's files, so its shape wins over the recipe's.
  varies: lists of alternative bindings (`--vary NAME=[v1,v2]`), applied last.
  Names join the parts that vary: `nanogpt/gpt2_small/data2xfsdp4/b8/s256/scan_layers=False`.
  """
  sizes = list(sizes or []) or [None]
  meshes = list(meshes or []) or [""]
  batches = list(batches or []) or [None]
  seqs = list(seqs or []) or [None]
  varies = [v for v in (varies or []) if v]
  points = []
  for (bname, files, binds), size, mesh, batch, seq, *extra in itertools.product(
      bases, sizes, meshes, batches, seqs, *varies):
    parts = [bname]
    if len(sizes) > 1 or size:
      parts.append(os.path.basename(size).removesuffix(".gin") if size else "recipe")
    if len(meshes) > 1:
      parts.append(mesh.replace("=", "").replace(",", "x") or "auto")
    if len(batches) > 1 or batch:
      parts.append(f"b{batch}" if batch else "b-recipe")
    if len(seqs) > 1 or seq:
      parts.append(f"s{seq}" if seq else "s-recipe")
    parts += [b.split(" = ")[0].rsplit(".", 1)[-1] + "=" + b.split(" = ", 1)[1] for b in extra]
    all_files = list(files) + ([size_file(size)] if size else [])
    points.append(Point("/".join(parts), tuple(all_files), tuple(binds) + tuple(extra), mesh,
                        batch, seq))
  return points


def configure(point: Point, extra_bindings: list[str] = ()):
  """The Experiment of a point: its files and bindings, then batch/seq, dropout 0, max_len."""
  from bigmodel import config
  binds = list(point.bindings) + list(extra_bindings)
  if point.batch:
    binds.append(f"TrainConfig.batch_size = {point.batch}")
  if point.seq:
    binds.append(f"DataConfig.seq_len = {point.seq}")
  exp = config.load(list(point.files), binds)
  model = dataclasses.replace(exp.model, dropout=0.0,
                              max_len=max(exp.model.max_len, exp.data.seq_len))
  return dataclasses.replace(exp, model=model)


# ---------------------------------------------------------------------------------------
# Random batches.

def random_batch(objective: str, batch: int, seq: int, vocab: int, seed: int = 0) -> dict:
  """Host numpy batch of random tokens with the keys and dtypes of the objective's real ones."""
  import numpy as np
  from bigmodel import objectives
  example = objectives.get(objective).example_batch(batch, seq)
  rng = np.random.default_rng(seed)
  out = {}
  for k, v in example.items():
    shape, dtype = tuple(v.shape), np.dtype(v.dtype)
    if k in ("inputs", "targets", "input_ids", "masked_lm_ids"):
      out[k] = rng.integers(0, vocab, shape).astype(dtype)
    elif k == "positions":
      out[k] = np.broadcast_to(np.arange(seq, dtype=dtype), shape).copy()
    elif k == "masked_lm_positions":
      out[k] = np.sort(rng.choice(np.arange(1, seq), size=shape, replace=True), -1).astype(dtype)
    elif k == "segment_ids":
      out[k] = (np.ones(shape, dtype) if objective == "causal_lm"
                else (np.arange(seq) >= seq // 2).astype(dtype)[None].repeat(batch, 0))
    elif k == "next_sentence_labels":
      out[k] = rng.integers(0, 2, shape).astype(dtype)
    else:                                                   # masks and weights
      out[k] = np.ones(shape, dtype)
  return out


# ---------------------------------------------------------------------------------------
# Runners: one object per framework with `.step()` (blocking) so rounds can interleave.

class BigmodelRunner:
  framework = "bigmodel"

  def __init__(self, exp, devices=None):
    import jax
    from bigmodel import sharding
    from bigmodel.train.loop import Components
    from bigmodel.train.state import param_count
    self.exp = exp
    self.mesh = sharding.make_mesh(exp.mesh, devices)
    self.comp = Components.build(exp, self.mesh)
    host = random_batch(exp.train.objective, exp.train.batch_size, exp.data.seq_len,
                        exp.model.vocab_size)
    self.batch = jax.device_put(host, sharding.batch_sharding(self.mesh))
    t = time.perf_counter()
    self.compiled = self.comp.train_step().lower(self.comp.abstract, self.batch).compile()
    self.compile_s = time.perf_counter() - t
    self.memory = memory_per_device(self.compiled)
    self.state = self.comp.init_state(jax.random.key(0))
    self.metrics = None
    self.params = param_count(self.comp.abstract.params)
    self.devices = self.mesh.size

  def step(self):
    import jax
    self.state, self.metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready(self.metrics)

  def loss(self) -> float:
    return float(self.metrics["loss"])

  def flops_per_token(self, causal: bool) -> float:
    return self.comp.flops_per_token(causal=causal)


def widest_loop_fusion(hlo_text: str) -> int:
  """The most operands any elementwise (kLoop) fusion takes in a compiled program's HLO."""
  import re
  counts = [len(re.findall(r"%[\w.\-]+", m.group(1)))
            for m in re.finditer(r" fusion\((.*?)\), kind=kLoop", hlo_text)]
  return max(counts, default=0)


def residual_gradient_check(runner) -> dict:
  """The figure `layers.materialize_cotangent` protects, for `make bench` to show.

  Without it XLA:CPU fused the residual stream's gradient (a sum over every layer above)
  into each backward consumer, so the widest fusion grew with depth and each layer re-added
  the layers above it (15% of a GPT-2-small step). The same step is compiled again with the
  barrier replaced by the identity: the two widths should differ, and the one with the
  barrier should not grow with the number of layers. What is compiled (not run) is the
  gradient of the point's loss, without the optimizer, whose update fusions would
  otherwise be the widest at small depths."""
  from unittest import mock
  import jax
  from bigmodel.models import layers
  comp = runner.comp

  def widest() -> int:
    grad = jax.jit(jax.grad(lambda p, b: comp.objective.loss_fn(comp.model, p, b)[0]))
    return widest_loop_fusion(grad.lower(comp.abstract.params, runner.batch).compile().as_text())
  with_barrier = widest()
  with mock.patch.object(layers, "materialize_cotangent", lambda x: x):
    without = widest()
  return {"widest_fusion_operands": with_barrier,
          "widest_fusion_operands_without_barrier": without}


def memory_per_device(compiled) -> int | None:
  try:
    mem = compiled.memory_analysis()
  except Exception:  # some backends do not implement it
    return None
  if mem is None:
    return None
  return int(mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
             - mem.alias_size_in_bytes)


def baseline_mismatch(exp) -> str:
  """Why the HF baseline cannot run this config ("" when it can)."""
  m = exp.model
  if exp.train.objective not in ("causal_lm", "bert_mlm_nsp"):
    return f"no baseline for objective {exp.train.objective!r}"
  if m.dtype != "float32" or m.param_dtype != "float32":
    return "the baseline runs float32 only"
  if m.positions != "learned" or m.norm != "layernorm" or not m.use_bias:
    return "GPT2/BERT have learned positions, LayerNorm and biases"
  if m.mlp not in ("gelu", "gelu_exact"):
    return "GPT2/BERT have a GELU MLP"
  want_pre = exp.train.objective == "causal_lm"
  if m.pre_norm != want_pre:
    return "GPT2 is pre-LN and BERT post-LN"
  if exp.optim.name != "adamw":
    return "the baseline optimizer is AdamW"
  if m.head_dim and m.head_dim * m.num_heads != m.d_model:
    return "HF models need head_dim * heads == d_model"
  return ""


def _prediction_slots(exp) -> int:
  """Masked-LM prediction slots per row in the batches bigmodel's step gets at this point."""
  from bigmodel import objectives
  example = objectives.get(exp.train.objective).example_batch(1, exp.data.seq_len)
  return int(example["masked_lm_positions"].shape[1])


class HFTorchRunner:
  """Hugging Face transformers on PyTorch CPU at the same config: float32, dropout 0,
  AdamW (fused CPU kernel) with the same betas/eps/decay and global-norm clipping.

  Encoders run `BertForPreTraining` with the work bigmodel's step does: the MLM head on the
  gathered masked positions only (google-research/bert's `gather_indexes`), plus NSP;
  `BertForMaskedLM(labels=...)` would project all positions onto the vocabulary."""

  def __init__(self, exp, threads: int = 0):
    import torch
    import transformers
    self.torch = torch
    if threads:
      torch.set_num_threads(threads)
    torch.manual_seed(0)
    m, o = exp.model, exp.optim
    b, s = exp.train.batch_size, exp.data.seq_len
    self.framework = f"transformers {transformers.__version__} / torch {torch.__version__}"
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, m.vocab_size, (b, s), generator=gen)
    self.mlm = None
    if exp.train.objective == "causal_lm":
      cfg = transformers.GPT2Config(
          vocab_size=m.vocab_size, n_positions=m.max_len, n_embd=m.d_model, n_layer=m.num_layers,
          n_head=m.num_heads, n_inner=m.mlp_dim,
          activation_function="gelu_new" if m.mlp == "gelu" else "gelu",
          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=m.norm_eps,
          tie_word_embeddings=m.tie_embeddings)
      self.model = transformers.GPT2LMHeadModel(cfg)
      self.inputs = {"input_ids": ids, "labels": ids}
    else:
      cfg = transformers.BertConfig(
          vocab_size=m.vocab_size, hidden_size=m.d_model, num_hidden_layers=m.num_layers,
          num_attention_heads=m.num_heads, intermediate_size=m.mlp_dim,
          hidden_act="gelu" if m.mlp == "gelu_exact" else "gelu_new",
          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
          max_position_embeddings=m.max_len, type_vocab_size=m.type_vocab_size,
          layer_norm_eps=m.norm_eps, tie_word_embeddings=m.tie_embeddings)
      self.model = transformers.BertForPreTraining(cfg)
      slots = _prediction_slots(exp)
      positions = torch.sort(torch.stack([torch.randperm(s - 1, generator=gen)[:slots] + 1
                                          for _ in range(b)]), -1).values
      self.inputs = {"input_ids": ids, "token_type_ids": (torch.arange(s) >= s // 2).long()
                     .expand(b, s), "attention_mask": torch.ones((b, s), dtype=torch.long)}
      self.mlm = (positions, torch.gather(ids, 1, positions),
                  torch.randint(0, 2, (b,), generator=gen))
    self.model.train()
    self.params = sum(p.numel() for p in self.model.parameters())
    self.clip = o.clip_norm
    self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.learning_rate, betas=(o.b1, o.b2),
                                 eps=o.eps, weight_decay=o.weight_decay, fused=True)
    self.exp = exp
    self.devices = 1
    self.memory = None
    self.last_loss = float("nan")
    t = time.perf_counter()
    self.step()
    self.compile_s = None
    self.first_step_s = time.perf_counter() - t

  def _bert_loss(self):
    """MLM + NSP as google-research/bert computes it: the MLM head (transform and the V x d
    projection) only at the gathered masked positions, as bigmodel's encoder does."""
    torch = self.torch
    positions, ids, nsp_labels = self.mlm
    hidden, pooled = self.model.bert(**self.inputs, return_dict=False)[:2]
    gathered = torch.gather(hidden, 1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
    scores = self.model.cls.predictions(gathered)                  # [b, slots, V]
    mlm = torch.nn.functional.cross_entropy(scores.flatten(0, 1), ids.flatten())
    nsp = torch.nn.functional.cross_entropy(self.model.cls.seq_relationship(pooled), nsp_labels)
    return mlm + nsp

  def step(self):
    self.opt.zero_grad(set_to_none=True)
    loss = self.model(**self.inputs).loss if self.mlm is None else self._bert_loss()
    loss.backward()
    if self.clip > 0:
      self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
    self.opt.step()
    self.last_loss = loss.detach()

  def loss(self) -> float:
    return float(self.last_loss)


# ---------------------------------------------------------------------------------------
# Measurement.

def time_interleaved(runners: list, *, warmup: int, steps: int, rounds: int,
                     round_seconds: float = 1.0) -> list[list[list[float]]]:
  """times[runner][round] = seconds of each timed step. Each round runs `steps` steps of
  every runner in turn, so that a change in machine load hits all of them alike.
  steps=0: as many steps as fill about `round_seconds` (from the last warm-up step), so
  that a fast step gets more samples."""
  counts = []
  for r in runners:
    dt = 0.0
    for _ in range(max(warmup, 1 if not steps else 0)):
      t = time.perf_counter()
      r.step()
      dt = time.perf_counter() - t
    counts.append(steps or max(1, min(50, round(round_seconds / max(dt, 1e-6)))))
  times: list[list[list[float]]] = [[] for _ in runners]
  for _ in range(rounds):
    for i, r in enumerate(runners):
      this_round = []
      for _ in range(counts[i]):
        t = time.perf_counter()
        r.step()
        this_round.append(time.perf_counter() - t)
      times[i].append(this_round)
  return times


def input_pipeline(exp, devices=None, seconds: float = 3.0, max_batches: int = 2000) -> dict:
  """Tokens/s that the real tf.data pipeline delivers as global device arrays."""
  from bigmodel import objectives, sharding
  from bigmodel.data import lm as lm_data
  from bigmodel.data.sources import DataError
  data_cfg = exp.data
  source = "recipe data"
  if exp.train.objective != "causal_lm":
    return {"input_source": f"not measured for {exp.train.objective}"}
  if not data_cfg.files and not data_cfg.tfds_name:
    data_dir = data_cfg.data_dir or os.environ.get("BIGMODEL_DATA_DIR", "")
    data_cfg = dataclasses.replace(data_cfg, files=(FALLBACK_TEXT,), data_dir=data_dir,
                                   tokenizer="byte", documents="file")
    source = f"{FALLBACK_TEXT} (byte tokens; the point has no data of its own)"
  try:
    data = objectives.get(exp.train.objective).build_data(data_cfg, None)
  except (DataError, OSError, ValueError) as e:
    return {"input_source": f"not measured: {e}"}
  mesh = sharding.make_mesh(exp.mesh, devices)
  b, s = exp.train.batch_size, exp.data.seq_len
  it = lm_data.global_iterator(data.train_batches(b, 0, sharding.host_batch_slice(mesh, b)),
                               sharding.batch_sharding(mesh))
  for _ in range(3):
    next(it)
  n, t0 = 0, time.perf_counter()
  while n < max_batches and time.perf_counter() - t0 < seconds:
    next(it)
    n += 1
  tps = n * b * s / (time.perf_counter() - t0)
  return {"input_tokens_per_sec": tps, "input_source": source}


def profile(runner, steps: tuple[int, int], logdir: str) -> str:
  """Runs `stop` more steps, tracing steps [start, stop) with jax.profiler."""
  import jax
  start, stop = steps
  os.makedirs(logdir, exist_ok=True)
  for i in range(stop):
    if i == start:
      jax.profiler.start_trace(logdir)
    with jax.profiler.StepTraceAnnotation("train", step_num=i):
      runner.step()
  jax.profiler.stop_trace()
  return logdir


def record(name: str, runner, exp, times: list[float], peak: float,
           fpt: tuple[float, float]) -> dict:
  """fpt: (PaLM, causal) training FLOPs per token of the model, the same for every framework."""
  step_s = statistics.median(times)
  b, s = exp.train.batch_size, exp.data.seq_len
  tps = b * s / step_s
  m = exp.model
  mesh = dict(runner.mesh.shape) if hasattr(runner, "mesh") else {"data": 1, "fsdp": 1, "tensor": 1}
  fpt_palm, fpt_causal = fpt
  return {
      "name": name, "framework": runner.framework, "objective": exp.train.objective,
      "config": {"layers": m.num_layers, "heads": m.num_heads, "d_model": m.d_model,
                 "d_ff": m.mlp_dim, "vocab": m.vocab_size, "positions": m.positions,
                 "norm": m.norm, "mlp": m.mlp, "dtype": m.dtype, "remat": m.remat,
                 "scan_layers": m.scan_layers},
      "mesh": mesh, "devices": runner.devices, "batch": b, "seq": s,
      "params": runner.params, "flops_per_token_palm": fpt_palm,
      "flops_per_token_causal": fpt_causal,
      "tokens_per_sec": tps, "tokens_per_sec_per_device": tps / runner.devices,
      "sequences_per_sec": b / step_s,
      "step_ms": step_s * 1e3, "step_ms_all": [round(x * 1e3, 3) for x in times],
      "mfu_palm": tps * fpt_palm / peak, "mfu_causal": tps * fpt_causal / peak,
      "memory_bytes_per_device": runner.memory, "compile_s": runner.compile_s,
      "loss_after": runner.loss(),
  }


def bench_point(point: Point, *, peak: float, warmup: int = 2, steps: int = 3, rounds: int = 3,
                baseline: str = "auto", pipeline: bool = True, profile_steps=None,
                profile_dir: str = "out/bench/profile", extra_bindings=(), log=print,
                residual_check: bool = False) -> list[dict]:
  """Records for one point: bigmodel, and the baseline beside it when there is one."""
  import jax
  from bigmodel import config
  exp = configure(point, extra_bindings)
  if point.mesh:
    exp = dataclasses.replace(exp, mesh=config.parse_mesh(point.mesh))
  cpu = jax.devices()[0].platform == "cpu"
  n = mesh_devices(point.mesh) or (1 if cpu else jax.device_count())
  if n > jax.device_count():
    raise config.ConfigError(f"mesh {point.mesh!r} needs {n} devices; {jax.device_count()} exist")
  devices = jax.devices()[:n]
  if not point.mesh:
    exp = dataclasses.replace(exp, mesh=config.MeshConfig(data=-1))
  runners = [BigmodelRunner(exp, devices)]
  note = ""
  if baseline != "off":
    why = baseline_mismatch(exp) or ("" if cpu and n == 1 else
                                     "the baseline is one CPU process: compared at 1-device CPU points")
    if why:
      if baseline == "on":
        log(f"{point.name}: no baseline: {why}")
      note = why
    else:
      try:
        runners.append(HFTorchRunner(exp))
      except ImportError as e:
        if baseline == "on":
          raise
        note = f"baseline skipped: {e} (pip install -e '.[bench]')"
        log(f"{point.name}: {note}")
  times = time_interleaved(runners, warmup=warmup, steps=steps, rounds=rounds)
  fpt = (runners[0].flops_per_token(False), runners[0].flops_per_token(True))
  recs = [record(point.name, r, exp, [x for rnd in t for x in rnd], peak, fpt)
          for r, t in zip(runners, times)]
  for rec, t in zip(recs, times):
    rec["steps_per_round"] = len(t[0])
  main = recs[0]
  if len(recs) > 1:
    per_round = [statistics.median(tb) / statistics.median(tj) for tj, tb in zip(times[0], times[1])]
    # Paired by round (both frameworks ran back to back), so that a load spike on this shared
    # machine moves one round's ratio, not the whole result.
    main["ratio_vs_baseline"] = statistics.median(per_round)
    main["ratio_vs_baseline_rounds"] = [round(x, 3) for x in per_round]
    main["ratio_of_median_tokens_per_sec"] = main["tokens_per_sec"] / recs[1]["tokens_per_sec"]
    recs[1]["first_step_s"] = runners[1].first_step_s
    recs[1]["torch_threads"] = runners[1].torch.get_num_threads()
    recs[1]["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY", "")
  elif note:
    main["baseline_note"] = note
  if pipeline:
    main.update(input_pipeline(exp, devices))
    if main.get("input_tokens_per_sec"):
      main["input_headroom"] = main["input_tokens_per_sec"] / main["tokens_per_sec"]
  if residual_check and exp.model.num_layers > 1:
    main["residual_gradient"] = residual_gradient_check(runners[0])
  if profile_steps:
    d = os.path.join(profile_dir, point.name.replace("/", "_"))
    main["profile_dir"] = profile(runners[0], profile_steps, d)
  return recs


# ---------------------------------------------------------------------------------------
# Output.

def _mesh_str(mesh: dict) -> str:
  return "x".join(f"{k}{v}" for k, v in mesh.items() if v > 1) or "1 device"


def _host_str(host: dict) -> str:
  versions = ", ".join(f"{k} {host[k]}" for k in ("jax", "torch", "transformers") if host.get(k))
  return (f"{host['cpu_model']}, {host['cpu_usable']} of {host['cpu_count']} cores usable, "
          f"{host['device_count']} {host['platform']} device(s) ({host['device_kind']}); {versions}")


def _pct(mfu: float) -> str:
  """An MFU as a percentage; above 1 it is no utilization (the peak was measured too low)."""
  return f"{mfu:.1%}" if mfu <= 1 else "n/a (above the peak)"


def rescore(record: dict, peak: float) -> None:
  """MFU of a record against the final peak; an MFU above 1 is kept apart, never as `mfu_*`."""
  for conv in ("palm", "causal"):
    mfu = record["tokens_per_sec"] * record[f"flops_per_token_{conv}"] / peak
    record[f"mfu_{conv}"] = mfu
    if mfu > 1:
      record[f"mfu_{conv}_above_peak"] = True
  record["peak_flops"] = peak


def format_table(records: list[dict], peak: float, peak_how: str, host: dict | None = None) -> str:
  lines = ([f"host: {_host_str(host)}"] if host else []) + [
           f"peak: {peak / 1e9:,.1f} GFLOP/s ({peak_how}); MFU (PaLM) counts 6N + 12·L·H·Q·T "
           f"FLOPs/token, MFU (causal) half the attention term", "",
           "| point | framework | mesh | batch x seq | params | tokens/s | sequences/s | "
           "tokens/s/device | step ms | MFU (PaLM) | MFU (causal) | memory/device | compile s | "
           "vs baseline | input headroom |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in records:
    mem = r.get("memory_bytes_per_device")
    mem = f"{mem / 2**20:,.0f} MiB" if mem else "-"
    comp = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else "-"
    ratio = f"**{r['ratio_vs_baseline']:.2f}x**" if r.get("ratio_vs_baseline") else "-"
    head = f"{r['input_headroom']:,.0f}x" if r.get("input_headroom") else "-"
    lines.append(
        f"| {r['name']} | {r['framework']} | {_mesh_str(r['mesh'])} | {r['batch']} x {r['seq']} | "
        f"{r['params'] / 1e6:,.1f}M | {r['tokens_per_sec']:,.0f} | {r['sequences_per_sec']:,.1f} | "
        f"{r['tokens_per_sec_per_device']:,.0f} | {r['step_ms']:,.1f} | {_pct(r['mfu_palm'])} | "
        f"{_pct(r['mfu_causal'])} | {mem} | {comp} | {ratio} | {head} |")
  return "\n".join(lines)


REQUIRED_KEYS = ("name", "framework", "config", "mesh", "batch", "seq", "tokens_per_sec",
                 "step_ms", "mfu_palm", "mfu_causal", "memory_bytes_per_device", "compile_s")


def parse_steps(spec: str) -> tuple[int, int]:
  try:
    a, b = (int(x) for x in spec.split(":"))
  except ValueError:
    raise argparse.ArgumentTypeError(f"--profile_steps {spec!r}: expected A:B, e.g. 3:6") from None
  if not 0 <= a < b:
    raise argparse.ArgumentTypeError(f"--profile_steps {spec!r}: need 0 <= A < B")
  return a, b


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="bigmodel bench", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--preset", action="append", choices=sorted(PRESETS),
                 help=f"named points (default, without --recipe: {' '.join(DEFAULT_PRESETS)})")
  p.add_argument("--recipe", "--gin_file", dest="recipe", action="append", default=[],
                 help="a recipe gin file: one base of the grid (repeatable)")
  p.add_argument("--size", action="append", default=[],
                 help="model size: experiments/sizes/NAME.gin or a path (repeatable)")
  p.add_argument("--mesh", action="append", default=[],
                 help="mesh layout, e.g. data=2,fsdp=2,tensor=2 (repeatable; default one device "
                      "on CPU, all devices on accelerators)")
  p.add_argument("--batch", action="append", help="global batch sizes, e.g. 8,16 (repeatable)")
  p.add_argument("--seq", action="append", help="sequence lengths, e.g. 64,256 (repeatable)")
  p.add_argument("--vary", action="append", type=parse_vary, default=[],
                 help="a grid over any binding, e.g. \"ModelConfig.scan_layers=[True,False]\" "
                      "(repeatable)")
  p.add_argument("--devices", type=int, default=0,
                 help="fake CPU devices (default: the largest mesh of the grid)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps per framework")
  p.add_argument("--steps", type=int, default=0,
                 help="timed steps per round (default 0: as many as fill ~1 s, at least 1)")
  p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median over all)")
  p.add_argument("--baseline", choices=("auto", "on", "off"), default="auto",
                 help="HF transformers/PyTorch side by side (auto: where it applies and torch "
                      "is installed; on: fail without torch)")
  p.add_argument("--no_input_pipeline", action="store_true",
                 help="skip the tf.data throughput measurement")
  p.add_argument("--peak_flops", type=float, default=0.0,
                 help="datasheet peak FLOP/s per device (default: measure a matmul)")
  p.add_argument("--no_residual_check", action="store_true",
                 help="skip compiling each point again without materialize_cotangent (the "
                      "widest backward fusion with and without it)")
  p.add_argument("--profile_steps", type=parse_steps, default=None,
                 help="A:B: after timing, run B more steps tracing [A, B) with jax.profiler")
  p.add_argument("--out", default="out/bench/results.json",
                 help="a .json file (the markdown table goes beside it as .md), or a directory "
                      "for results.json and results.md")
  return p


def out_paths(out: str) -> tuple[str, str]:
  """--out -> (json path, markdown path): a `.json` path as given, anything else a directory."""
  if out.endswith(".json") and not os.path.isdir(out):
    return out, out[:-len(".json")] + ".md"
  return os.path.join(out, "results.json"), os.path.join(out, "results.md")


def main(argv: list[str] | None = None) -> int:
  from bigmodel import hostmem
  malloc = "kept freed (bigmodel.hostmem)" if hostmem.keep_freed_memory() else "system default"
  # ^ both frameworks of a point run in this process, under the same allocator settings
  argv = list(sys.argv[1:] if argv is None else argv)
  bindings = [a[len("--gin."):] for a in argv if a.startswith("--gin.")]
  bindings = [b.replace("=", " = ", 1) if " = " not in b else b for b in bindings]
  args = _parser().parse_args([a for a in argv if not a.startswith("--gin.")])
  bases = [(os.path.basename(f).removesuffix(".gin"), [f], []) for f in args.recipe]
  for name in args.preset or ([] if bases else list(DEFAULT_PRESETS)):
    files, b = PRESETS[name]
    bases.append((name, files, b))
  json_path, md_path = out_paths(args.out)
  try:   # before the runs, so that a bad --out loses no results
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    if os.path.isdir(json_path):
      raise IsADirectoryError(f"{json_path} is a directory")
  except OSError as e:
    print(f"bigmodel bench: error: --out {args.out!r}: {e}", file=sys.stderr)
    return 2
  points = expand_grid(bases, args.size, args.mesh, _split_ints(args.batch), _split_ints(args.seq),
                       args.vary)
  need = max([args.devices] + [mesh_devices(p.mesh) for p in points])
  if need > 1 and "jax" not in sys.modules:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
      os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={need}".strip()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  # PyTorch's OpenMP threads spin at barriers by default; on a machine whose cores other
  # processes also use, a descheduled spinner stalls the baseline's steps many times over.
  # Sleeping waiters keep the baseline honest.
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  import jax
  from bigmodel import flops
  from bigmodel.config import ConfigError
  if args.baseline != "off":
    try:   # so that host_info() records their versions
      import torch  # noqa: F401
      import transformers  # noqa: F401
    except ImportError:
      pass
  run_peak = flops.Peak.for_run(args.peak_flops or None)
  peak = run_peak.flops
  host = flops.host_info()
  print(f"host: {_host_str(host)}", flush=True)
  print(f"peak: {peak / 1e9:,.1f} GFLOP/s ({run_peak.source}); {jax.device_count()} "
        f"{jax.devices()[0].platform} devices; {len(points)} points; host malloc: {malloc}",
        flush=True)
  records = []
  for point in points:
    try:
      recs = bench_point(point, peak=peak, warmup=args.warmup, steps=args.steps,
                         rounds=args.rounds, baseline=args.baseline,
                         pipeline=not args.no_input_pipeline, profile_steps=args.profile_steps,
                         profile_dir=os.path.join(os.path.dirname(json_path) or ".", "profile"),
                         extra_bindings=bindings, residual_check=not args.no_residual_check)
    except ConfigError as e:
      print(f"bigmodel bench: error: {point.name}: {e}", file=sys.stderr, flush=True)
      return 2
    for r in recs:
      r["peak_flops"] = peak
      extra = (f", {r['ratio_vs_baseline']:.2f}x baseline" if r.get("ratio_vs_baseline") else "")
      extra += (f", input headroom {r['input_headroom']:,.0f}x" if r.get("input_headroom") else "")
      if r.get("residual_gradient"):
        g = r["residual_gradient"]
        extra += (f", widest backward fusion {g['widest_fusion_operands']} operands "
                  f"({g['widest_fusion_operands_without_barrier']} without materialize_cotangent)")
      print(f"{r['name']} [{r['framework']}]: {r['tokens_per_sec']:,.0f} tokens/s, "
            f"{r['step_ms']:.1f} ms/step, MFU {_pct(r['mfu_palm'])} (PaLM){extra}", flush=True)
      if r.get("profile_dir"):
        print(f"  trace: {r['profile_dir']} (tensorboard --logdir {r['profile_dir']}, or "
              f"ui.perfetto.dev on its .trace.json.gz)", flush=True)
    records += recs
  return write_results(records, run_peak, peak, host, malloc, args, json_path, md_path)


def write_results(records, run_peak, peak_at_start: float, host: dict, malloc: str, args,
                  json_path: str, md_path: str) -> int:
  """Re-measures a measured peak, scores every record against it, writes results.json/.md."""
  import jax
  if run_peak.matmul:     # measured: again after the runs; the best of both (and the record)
    run_peak.measure()
  peak = run_peak.flops
  host.update(peak_flops=peak, peak_source=run_peak.source, peak_flops_at_start=peak_at_start,
              host_malloc=malloc)
  for r in records:
    rescore(r, peak)
    r["host"] = {k: host.get(k) for k in ("cpu_model", "cpu_usable", "peak_flops", "jax", "torch")}
  table = format_table(records, peak, run_peak.source, host)
  out = {"peak_flops": peak, "peak_source": run_peak.source, "peak_flops_at_start": peak_at_start,
         "platform": jax.devices()[0].platform, "device_kind": jax.devices()[0].device_kind,
         "host": host, "cpu_count": os.cpu_count(), "jax": jax.__version__, "host_malloc": malloc,
         "settings": {"warmup": args.warmup, "steps": args.steps, "rounds": args.rounds},
         "records": records}
  print()
  print(table, flush=True)
  with open(json_path, "w") as f:
    json.dump(out, f, indent=1, default=_json_default)
  with open(md_path, "w") as f:
    f.write(table + "\n")
  print(f"\nwrote {json_path} and {md_path}")
  return 0


def _json_default(x: Any):
  try:
    return float(x)
  except (TypeError, ValueError):
    return str(x)


if __name__ == "__main__":
  sys.exit(main())
