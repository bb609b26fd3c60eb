"""bigmodel workdirs of imported models, and their way back to Hugging Face.

`from_hf(model_dir, out)` writes what `bigmodel train` writes, so that `eval`, `sample`,
continued training and fine-tuning read it like any run:

    OUT/config.gin              the model's size and options, plus run settings to override
    OUT/checkpoints/0/          orbax: state (step 0, params, fresh optimizer state) + meta
    OUT/vocab.txt | vocab.json + merges.txt, tokenizer_config.json, ...   the tokenizer
    OUT/hf_import.json          the source architecture, heads and original config.json

`to_hf(workdir, out)` restores the latest params of any workdir whose model is a GPT-2- or
Llama-shaped decoder (Llama, Mistral, Qwen2) or a BERT-shaped encoder and writes config.json + model.safetensors (+ tokenizer).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from bigmodel import storage
from bigmodel.config import ModelConfig
from bigmodel.interop import hf as hf_lib

log = logging.getLogger(__name__)

RECORD = "hf_import.json"

# Run settings written under the model's size: override them with --gin.NAME=VALUE.
GIN_RUN = """
# Run settings for eval, sample, continued training or fine-tuning: override them with
# --gin.NAME=VALUE (e.g. --gin.DataConfig.files="['my.txt']" --gin.TrainConfig.train_steps=1000).
TrainConfig.objective = {objective!r}
TrainConfig.train_steps = 1000
TrainConfig.batch_size = 8
DataConfig.seq_len = {seq_len}
DataConfig.tokenizer = {tokenizer!r}
DataConfig.data_dir = %DATA_DIR
OptimConfig.learning_rate = {lr}
OptimConfig.warmup_steps = 100
{optim}"""

# BERT's fine-tuning optimizer (google-research/bert): AdamW b2 0.999, eps 1e-6, decay 0.01,
# linear decay to 0.
BERT_OPTIM = """OptimConfig.b2 = 0.999
OptimConfig.eps = 1e-6
OptimConfig.weight_decay = 0.01
OptimConfig.decay = 'linear'
OptimConfig.end_lr_fraction = 0.0
"""

MODEL_FIELDS = ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_len", "dropout",
                "positions", "norm", "mlp", "pre_norm", "use_bias", "tie_embeddings", "norm_eps",
                "type_vocab_size", "init_std")
# Written only when they differ from ModelConfig's defaults (Llama-family imports).
OPTIONAL_FIELDS = ("num_kv_heads", "head_dim", "rope_theta", "qkv_bias")
DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelConfig)}


def gin_text(model: hf_lib.HFModel, source: str, out_dir: str) -> str:
  cfg = model.config
  lines = [f"# {model.architecture} imported from Hugging Face ({source}) by `bigmodel convert "
           f"from-hf`.",
           "# The model's size and options: the checkpoint holds these shapes, keep them."]
  for name in MODEL_FIELDS:
    if name == "type_vocab_size" and model.family != "bert":
      continue
    value = getattr(cfg, name)
    lines.append(f"ModelConfig.{name} = {value!r}")
  for name in OPTIONAL_FIELDS:
    value = getattr(cfg, name)
    if value != DEFAULTS[name]:
      lines.append(f"ModelConfig.{name} = {value!r}")
  objective = _objective_for(model)
  seq_len = min(cfg.max_len, 128 if model.family == "bert" else 256)
  lines.append(GIN_RUN.format(objective=objective, seq_len=seq_len,
                              tokenizer=storage.absolute(out_dir),
                              lr=2e-5 if model.family == "bert" else 1e-4,
                              optim=BERT_OPTIM if model.family == "bert" else ""))
  return "\n".join(lines)


def _objective_for(model: hf_lib.HFModel) -> str:
  """The registered objective that trains this family's model ('causal_lm' for GPT-2)."""
  if model.family in hf_lib.DECODERS:
    return "causal_lm"
  from bigmodel import objectives
  for name, obj in objectives.OBJECTIVES.items():
    if obj.model == "encoder":
      return name
  return "causal_lm"   # no encoder objective registered yet: eval/train need one


def from_hf(model_dir: str, out_dir: str, *, allow_pickle: bool = False) -> dict:
  """Imports an HF checkpoint into a bigmodel workdir; returns a summary."""
  import jax
  from bigmodel import config as config_lib, sharding
  from bigmodel.data import hf_tokenizers
  from bigmodel.train import checkpoint, loop
  from bigmodel.train.state import TrainState

  model = hf_lib.read_hf(model_dir, allow_pickle=allow_pickle)
  ckpt_dir = storage.join(out_dir, "checkpoints")
  if storage.listdir(ckpt_dir):
    raise checkpoint.CheckpointError(f"{out_dir} already holds checkpoints: choose a new --out")
  storage.makedirs(out_dir)
  tokenizer = None
  if hf_tokenizers.has_files(model_dir):
    tokenizer = hf_tokenizers.load(model_dir)
    tokenizer.save(out_dir)
  else:
    log.warning("%s has no vocab.txt, vocab.json + merges.txt or tokenizer.json: no tokenizer written", model_dir)
  gin_path = storage.join(out_dir, "config.gin")
  gin_config = gin_text(model, model_dir, out_dir)
  storage.write_text(gin_path, gin_config)
  storage.write_json(storage.join(out_dir, RECORD),
                     {"source": storage.absolute(model_dir), **model.record()})
  exp = config_lib.load([], [gin_config]) if storage.is_remote(gin_path) else \
      config_lib.load([gin_path])

  mesh = sharding.make_mesh(exp.mesh)
  module = hf_lib.build_module(model.family, model.config, model.heads, mesh)
  params = hf_lib.place_params(model.params, module, mesh)
  tx, _ = loop.make_optimizer(exp)     # the optimizer state `bigmodel train` resumes
  opt_state = jax.jit(tx.init)(params)
  state = TrainState(step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=opt_state)
  ckpt = checkpoint.Checkpointer(ckpt_dir, async_save=False)
  ckpt.save(0, state, {"data_step": 0, "seed": exp.data.seed, "examples_seen": 0,
                       "imported_from": storage.absolute(model_dir),
                       "hf_architecture": model.architecture}, force=True)
  ckpt.wait()
  ckpt.close()
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(model.params))
  return {"architecture": model.architecture, "family": model.family, "params": n,
          "heads": list(model.heads), "tokenizer": type(tokenizer).__name__ if tokenizer else None,
          "workdir": storage.absolute(out_dir)}


def to_hf(workdir: str, out_dir: str) -> dict:
  """Exports a bigmodel workdir (its latest checkpoint) as an HF checkpoint directory."""
  from bigmodel.pretrained import load_pretrained
  pre = load_pretrained(workdir)
  paths = pre.to_hf(out_dir)
  return {"architecture": pre.architecture, "files": [storage.basename(p) for p in paths],
          "step": pre.step, "out": storage.absolute(out_dir)}
