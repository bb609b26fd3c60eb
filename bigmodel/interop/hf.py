"""Hugging Face checkpoints in and out: BERT (BertModel, BertForMaskedLM, BertForPreTraining),
GPT-2 (GPT2LMHeadModel) and Llama-family decoders (LlamaForCausalLM, MistralForCausalLM,
Qwen2ForCausalLM; their config and names in `bigmodel.interop.llama`).

    model = read_hf(model_dir)                 # config.json + model.safetensors -> HFModel
    model.config, model.params                 # ModelConfig, numpy params in bigmodel's tree
    write_hf(model, out_dir)                   # -> config.json + model.safetensors

An `HFModel` is what both directions share: the family ('bert' or 'gpt2'), the HF
architecture name, the bigmodel `ModelConfig`, which heads the checkpoint has, the params
as nested numpy dicts in the layout of `Decoder` / `Encoder` (scanned layers stacked on a
leading axis when `ModelConfig.scan_layers`), and the original config.json (kept so that an
export writes back the fields bigmodel does not model, such as token ids).

Weights load through `safetensors` (also sharded `model.safetensors.index.json`);
`pytorch_model.bin` is a pickle, which can run code when loaded, so it is refused unless
`allow_pickle=True` (then torch loads it with `weights_only=True`).

The name mapping is one table per family (`_gpt2_rules`, `_bert_rules`): each rule names
a bigmodel parameter, the HF tensor(s) it comes from, and the two reshapes between them.
HF `nn.Linear` kernels are [out, in] (BERT), GPT-2's `Conv1D` kernels are [in, out]; the
fused q/k/v projections become `qkv` [d, 3, h, k]. Every conversion is a reshape or a
transpose of float32 data, so a round trip HF -> bigmodel -> HF is bitwise exact.

Errors (`HFCheckpointError`) name the problem: a directory without config.json or weights,
an unsupported architecture or config value, missing or unexpected weights, a shape that
does not match the config.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import Any, Callable

import numpy as np

from bigmodel import storage
from bigmodel.config import ModelConfig
from bigmodel.interop import llama

log = logging.getLogger(__name__)

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"

ARCHITECTURES = {
    "BertModel": "bert",
    "BertForMaskedLM": "bert",
    "BertForPreTraining": "bert",
    "GPT2LMHeadModel": "gpt2",
    **{arch: family for family, arch in llama.FAMILIES.items()},
}
DECODERS = ("gpt2", *llama.FAMILIES)   # families held by a Decoder (the rest: Encoder)
# Weight groups each BERT architecture must have (BertModel's pooler is optional, as HF's
# add_pooling_layer; BertForMaskedLM has none but may carry one, as bert-base-uncased does).
BERT_REQUIRED_HEADS = {"BertModel": (), "BertForMaskedLM": ("mlm",),
                       "BertForPreTraining": ("mlm", "nsp", "pooler")}

# HF activation name -> ModelConfig.mlp, and back.
ACTIVATIONS = {"gelu": "gelu_exact", "gelu_new": "gelu", "gelu_pytorch_tanh": "gelu"}
GPT2_ACTIVATION = {"gelu": "gelu_new", "gelu_exact": "gelu"}
BERT_ACTIVATION = {"gelu_exact": "gelu", "gelu": "gelu_new"}


class HFCheckpointError(ValueError):
  """A Hugging Face checkpoint that cannot be imported or a model that cannot be exported."""


@dataclasses.dataclass
class HFModel:
  family: str                      # 'bert' | 'gpt2'
  architecture: str                # e.g. 'BertForPreTraining'
  config: ModelConfig
  params: dict                     # nested numpy arrays in bigmodel's layout
  heads: tuple[str, ...] = ()      # bert: the pretraining heads present, of ('mlm', 'nsp')
  has_pooler: bool = True          # bert: whether the checkpoint has pooler weights
  hf_config: dict = dataclasses.field(default_factory=dict)   # the original config.json

  def record(self) -> dict:
    """What a bigmodel workdir keeps about the import (hf_import.json)."""
    return {"family": self.family, "architecture": self.architecture, "heads": list(self.heads),
            "has_pooler": self.has_pooler, "hf_config": self.hf_config}


# ---------------------------------------------------------------------------------------------
# Config


def read_config(model_dir: str) -> dict:
  """config.json of an HF checkpoint directory, with a clear error when it is not one."""
  if not storage.isdir(model_dir):
    raise HFCheckpointError(f"{model_dir!r} is not a directory: pass a Hugging Face checkpoint "
                            f"directory (config.json + model.safetensors)")
  path = storage.join(model_dir, "config.json")
  if not storage.exists(path):
    raise HFCheckpointError(
        f"{model_dir!r} is not a Hugging Face checkpoint: it has no config.json (found: "
        f"{storage.listdir(model_dir)[:10]}). Download a model with "
        f"`hf download NAME --local-dir DIR` (huggingface_hub), or save one with "
        f"`model.save_pretrained(DIR)`")
  try:
    cfg = storage.read_json(path)
  except json.JSONDecodeError as e:
    raise HFCheckpointError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(cfg, dict):
    raise HFCheckpointError(f"{path} is not a JSON object")
  return cfg


def _architecture(hf: dict) -> tuple[str, str]:
  model_type = hf.get("model_type")
  archs = hf.get("architectures") or []
  supported = ", ".join(ARCHITECTURES)
  if model_type not in ("bert", *DECODERS):
    raise HFCheckpointError(
        f"unsupported model_type {model_type!r} (architectures {archs}): bigmodel imports "
        f"{supported}")
  if len(archs) > 1:
    raise HFCheckpointError(f"config.json lists several architectures {archs}; expected one of "
                            f"{supported}")
  if not archs:   # old checkpoints: take the family's fullest supported form, checked by weights
    return model_type, {"bert": "BertModel", "gpt2": "GPT2LMHeadModel", **llama.FAMILIES}[model_type]
  arch = archs[0]
  if arch not in ARCHITECTURES:
    raise HFCheckpointError(f"unsupported architecture {arch!r}: bigmodel imports {supported} "
                            f"(task heads such as sequence classification are added by "
                            f"fine-tuning, not imported)")
  if ARCHITECTURES[arch] != model_type:
    raise HFCheckpointError(f"architecture {arch!r} does not match model_type {model_type!r}")
  return model_type, arch


def _require(hf: dict, name: str, ok: Callable[[Any], bool], default, what: str):
  value = hf.get(name, default)
  if not ok(value):
    raise HFCheckpointError(f"unsupported config field {name}={value!r}: bigmodel supports {what}")
  return value


def _activation(hf: dict, name: str, default: str) -> str:
  act = hf.get(name, default)
  if act not in ACTIVATIONS:
    raise HFCheckpointError(f"unsupported config field {name}={act!r}: bigmodel supports "
                            f"{sorted(ACTIVATIONS)} (gelu = erf GELU, gelu_new = tanh approximation)")
  return ACTIVATIONS[act]


def _heads_dim(d: int, h: int) -> None:
  if h <= 0 or d % h:
    raise HFCheckpointError(f"hidden size {d} is not divisible by {h} attention heads")


def model_config(hf: dict, **overrides) -> tuple[str, str, ModelConfig]:
  """(family, architecture, ModelConfig) of an HF config.json dict; raises on what bigmodel
  cannot reproduce exactly."""
  try:
    return _model_config(hf, **overrides)
  except KeyError as e:
    raise HFCheckpointError(f"config.json has no {e.args[0]!r}, which a {hf.get('model_type')} "
                            f"config needs") from None
  except (TypeError, ValueError) as e:
    if isinstance(e, HFCheckpointError):
      raise
    raise HFCheckpointError(f"config.json has a value bigmodel cannot use: {e}") from None


def _model_config(hf: dict, **overrides) -> tuple[str, str, ModelConfig]:
  family, arch = _architecture(hf)
  if family in llama.FAMILIES:
    kw = llama.model_config(family, hf, HFCheckpointError)
  elif family == "gpt2":
    _require(hf, "add_cross_attention", lambda v: not v, False, "no cross-attention")
    _require(hf, "scale_attn_weights", lambda v: v is True, True, "scale_attn_weights=True")
    _require(hf, "scale_attn_by_inverse_layer_idx", lambda v: not v, False,
             "scale_attn_by_inverse_layer_idx=False")
    d, h = int(hf["n_embd"]), int(hf["n_head"])
    _heads_dim(d, h)
    kw = dict(vocab_size=int(hf["vocab_size"]), d_model=d, num_layers=int(hf["n_layer"]),
              num_heads=h, d_ff=int(hf.get("n_inner") or 4 * d), max_len=int(hf["n_positions"]),
              dropout=float(hf.get("resid_pdrop", 0.1)), positions="learned", norm="layernorm",
              mlp=_activation(hf, "activation_function", "gelu_new"), pre_norm=True, use_bias=True,
              tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
              norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
              init_std=float(hf.get("initializer_range", 0.02)))
  else:
    _require(hf, "position_embedding_type", lambda v: v in (None, "absolute"), "absolute",
             "position_embedding_type='absolute' (learned positions)")
    _require(hf, "is_decoder", lambda v: not v, False, "bidirectional encoders (is_decoder=False)")
    _require(hf, "add_cross_attention", lambda v: not v, False, "no cross-attention")
    d, h = int(hf["hidden_size"]), int(hf["num_attention_heads"])
    _heads_dim(d, h)
    kw = dict(vocab_size=int(hf["vocab_size"]), d_model=d, num_layers=int(hf["num_hidden_layers"]),
              num_heads=h, d_ff=int(hf["intermediate_size"]),
              max_len=int(hf["max_position_embeddings"]),
              dropout=float(hf.get("hidden_dropout_prob", 0.1)), positions="learned",
              norm="layernorm", mlp=_activation(hf, "hidden_act", "gelu"), pre_norm=False,
              use_bias=True, tie_embeddings=True, norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
              type_vocab_size=int(hf.get("type_vocab_size", 2)),
              init_std=float(hf.get("initializer_range", 0.02)))
  kw.update(overrides)
  return family, arch, ModelConfig(**kw)


def hf_config(model: HFModel, tokenizer=None) -> dict:
  """config.json for `model`: the imported original (if any) with every structural field
  rewritten from the ModelConfig. Raises when the config has no HF equivalent."""
  cfg = model.config
  if model.family in llama.FAMILIES:
    problems = llama.config_problems(model.family, cfg)
    if problems:
      raise HFCheckpointError(f"this model cannot be written as a Hugging Face {model.architecture}: "
                              f"ModelConfig " + "; ".join(problems))
    out = {k: v for k, v in model.hf_config.items() if k not in (
        "_name_or_path", "transformers_version", "torch_dtype", "dtype", "rope_theta", "rope_scaling")}
    out.update(architectures=[model.architecture], model_type=model.family,
               initializer_range=cfg.init_std, **llama.hf_fields(model.family, cfg))
    if tokenizer is not None and getattr(tokenizer, "eos_id", None) is not None:
      out.setdefault("eos_token_id", tokenizer.eos_id)
      if getattr(tokenizer, "bos_id", None) is not None:
        out.setdefault("bos_token_id", tokenizer.bos_id)
    return dict(sorted(out.items()))
  problems = []
  if cfg.num_kv_heads and cfg.kv_heads != cfg.num_heads:
    problems.append(f"num_kv_heads={cfg.num_kv_heads} (HF {model.family} is multi-head)")
  if cfg.qkv_bias and not cfg.use_bias:
    problems.append("qkv_bias=True without use_bias (HF layers all have biases)")
  if cfg.positions != "learned":
    problems.append(f"positions={cfg.positions!r} (HF {model.family} has learned positions)")
  if cfg.norm != "layernorm":
    problems.append(f"norm={cfg.norm!r} (HF {model.family} uses LayerNorm)")
  if cfg.mlp not in ("gelu", "gelu_exact"):
    problems.append(f"mlp={cfg.mlp!r} (HF {model.family} has a GELU MLP)")
  if not cfg.use_bias:
    problems.append("use_bias=False (HF layers have biases)")
  if cfg.dim_per_head * cfg.num_heads != cfg.d_model:
    problems.append(f"head_dim={cfg.head_dim} x num_heads={cfg.num_heads} != d_model={cfg.d_model}")
  if model.family == "gpt2" and not cfg.pre_norm:
    problems.append("pre_norm=False (GPT-2 is pre-LN)")
  if model.family == "bert" and cfg.pre_norm:
    problems.append("pre_norm=True (BERT is post-LN)")
  if model.family == "bert" and not cfg.tie_embeddings:
    problems.append("tie_embeddings=False (the BERT MLM decoder is tied)")
  if problems:
    raise HFCheckpointError(f"this {model.family} model cannot be written as a Hugging Face "
                            f"{model.architecture}: ModelConfig " + "; ".join(problems))
  out = dict(model.hf_config)
  for stale in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
    out.pop(stale, None)
  out["architectures"] = [model.architecture]
  out["model_type"] = model.family
  out["initializer_range"] = cfg.init_std
  if model.family == "gpt2":
    act = out.get("activation_function")
    out.update(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.num_layers,
               n_head=cfg.num_heads, n_inner=None if cfg.mlp_dim == 4 * cfg.d_model else cfg.mlp_dim,
               n_positions=cfg.max_len, layer_norm_epsilon=cfg.norm_eps,
               tie_word_embeddings=cfg.tie_embeddings,
               activation_function=act if ACTIVATIONS.get(act) == cfg.mlp else GPT2_ACTIVATION[cfg.mlp])
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
      out.setdefault(name, cfg.dropout)
    if tokenizer is not None and getattr(tokenizer, "eos_id", None) is not None:
      out.setdefault("bos_token_id", tokenizer.eos_id)
      out.setdefault("eos_token_id", tokenizer.eos_id)
  else:
    act = out.get("hidden_act")
    out.update(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.num_layers,
               num_attention_heads=cfg.num_heads, intermediate_size=cfg.mlp_dim,
               max_position_embeddings=cfg.max_len, layer_norm_eps=cfg.norm_eps,
               type_vocab_size=cfg.type_vocab_size, position_embedding_type="absolute",
               tie_word_embeddings=True,
               hidden_act=act if ACTIVATIONS.get(act) == cfg.mlp else BERT_ACTIVATION[cfg.mlp])
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
      out.setdefault(name, cfg.dropout)
    if tokenizer is not None and getattr(tokenizer, "pad_id", None) is not None:
      out.setdefault("pad_token_id", tokenizer.pad_id)
  return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------
# Name and shape mapping


@dataclasses.dataclass(frozen=True)
class Rule:
  """One bigmodel parameter <-> the HF tensor(s) it is made of.

  `path` is relative to a layer (`blocks/layers/...` or `blocks/layer_{i}/...`) when
  `layer` is true; the HF names then hold `{i}`. `to_bm(*hf_arrays)` and `to_hf(array)`
  (returning a tuple) are reshapes/transposes written with array methods, so that
  `jax.eval_shape` derives the HF shapes the config implies.
  """
  path: str
  hf: tuple[str, ...]
  to_bm: Callable
  to_hf: Callable
  group: str = "trunk"
  layer: bool = False


def _copy():
  return (lambda x: x), (lambda x: (x,))


def _transpose():
  return (lambda x: x.T), (lambda x: (x.T,))


def _norm_rules(path: str, hf: str, group="trunk", layer=False) -> list[Rule]:
  return [Rule(f"{path}/scale", (f"{hf}.weight",), *_copy(), group, layer),
          Rule(f"{path}/bias", (f"{hf}.bias",), *_copy(), group, layer)]


def _gpt2_rules(cfg: ModelConfig) -> list[Rule]:
  d, h, k = cfg.d_model, cfg.num_heads, cfg.dim_per_head
  L = "transformer.h.{i}."
  rules = [
      Rule("embed/embedding", ("transformer.wte.weight",), *_copy()),
      Rule("pos_embed/embedding", ("transformer.wpe.weight",), *_copy()),
      *_norm_rules("final_norm", "transformer.ln_f"),
      *_norm_rules("ln1", L + "ln_1", layer=True),
      *_norm_rules("ln2", L + "ln_2", layer=True),
      # Conv1D kernels are [in, out]; c_attn's output is q | k | v, each heads x head_dim.
      Rule("attn/qkv", (L + "attn.c_attn.weight",), lambda x: x.reshape(d, 3, h, k),
           lambda x: (x.reshape(d, 3 * h * k),), layer=True),
      Rule("attn/qkv_bias", (L + "attn.c_attn.bias",), lambda x: x.reshape(3, h, k),
           lambda x: (x.reshape(3 * h * k),), layer=True),
      Rule("attn/out", (L + "attn.c_proj.weight",), lambda x: x.reshape(h, k, d),
           lambda x: (x.reshape(h * k, d),), layer=True),
      Rule("attn/out_bias", (L + "attn.c_proj.bias",), *_copy(), layer=True),
      Rule("mlp/wi", (L + "mlp.c_fc.weight",), *_copy(), layer=True),
      Rule("mlp/wi_bias", (L + "mlp.c_fc.bias",), *_copy(), layer=True),
      Rule("mlp/wo", (L + "mlp.c_proj.weight",), *_copy(), layer=True),
      Rule("mlp/wo_bias", (L + "mlp.c_proj.bias",), *_copy(), layer=True),
  ]
  if not cfg.tie_embeddings:
    rules.append(Rule("lm_head", ("lm_head.weight",), *_transpose(), group="lm_head"))
  return rules


def _bert_rules(cfg: ModelConfig) -> list[Rule]:
  """Names without the `bert.` prefix of BertFor* models (added back on export)."""
  d, h, k = cfg.d_model, cfg.num_heads, cfg.dim_per_head
  L = "encoder.layer.{i}."
  A = L + "attention.self."
  stack = lambda q, kk, v: np.stack([q.T.reshape(d, h, k), kk.T.reshape(d, h, k),
                                     v.T.reshape(d, h, k)], axis=1)
  unstack = lambda x: tuple(x[:, n].reshape(d, h * k).T for n in range(3))
  stack_b = lambda q, kk, v: np.stack([q.reshape(h, k), kk.reshape(h, k), v.reshape(h, k)])
  unstack_b = lambda x: tuple(x[n].reshape(h * k) for n in range(3))
  return [
      Rule("embed/embedding", ("embeddings.word_embeddings.weight",), *_copy()),
      Rule("pos_embed/embedding", ("embeddings.position_embeddings.weight",), *_copy()),
      Rule("type_embed/embedding", ("embeddings.token_type_embeddings.weight",), *_copy()),
      *_norm_rules("embed_norm", "embeddings.LayerNorm"),
      Rule("attn/qkv", (A + "query.weight", A + "key.weight", A + "value.weight"), stack, unstack,
           layer=True),
      Rule("attn/qkv_bias", (A + "query.bias", A + "key.bias", A + "value.bias"), stack_b, unstack_b,
           layer=True),
      # nn.Linear kernels are [out, in].
      Rule("attn/out", (L + "attention.output.dense.weight",), lambda x: x.T.reshape(h, k, d),
           lambda x: (x.reshape(h * k, d).T,), layer=True),
      Rule("attn/out_bias", (L + "attention.output.dense.bias",), *_copy(), layer=True),
      *_norm_rules("ln1", L + "attention.output.LayerNorm", layer=True),
      Rule("mlp/wi", (L + "intermediate.dense.weight",), *_transpose(), layer=True),
      Rule("mlp/wi_bias", (L + "intermediate.dense.bias",), *_copy(), layer=True),
      Rule("mlp/wo", (L + "output.dense.weight",), *_transpose(), layer=True),
      Rule("mlp/wo_bias", (L + "output.dense.bias",), *_copy(), layer=True),
      *_norm_rules("ln2", L + "output.LayerNorm", layer=True),
      Rule("pooler/kernel", ("pooler.dense.weight",), *_transpose(), group="pooler"),
      Rule("pooler/bias", ("pooler.dense.bias",), *_copy(), group="pooler"),
      Rule("mlm/dense/kernel", ("cls.predictions.transform.dense.weight",), *_transpose(), group="mlm"),
      Rule("mlm/dense/bias", ("cls.predictions.transform.dense.bias",), *_copy(), group="mlm"),
      *_norm_rules("mlm/norm", "cls.predictions.transform.LayerNorm", group="mlm"),
      Rule("mlm/bias", ("cls.predictions.bias",), *_copy(), group="mlm"),
      Rule("nsp/kernel", ("cls.seq_relationship.weight",), *_transpose(), group="nsp"),
      Rule("nsp/bias", ("cls.seq_relationship.bias",), *_copy(), group="nsp"),
  ]


def rules_for(family: str, cfg: ModelConfig) -> list[Rule]:
  if family in llama.FAMILIES:
    return llama.rules(cfg, Rule, _copy, _transpose)
  return _gpt2_rules(cfg) if family == "gpt2" else _bert_rules(cfg)


# Buffers some checkpoints carry that are not weights.
_IGNORED = (re.compile(r"(^|\.)embeddings\.position_ids$"),
            re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$"),
            re.compile(r"(^|\.)rotary_emb\.inv_freq$"))


def _canonical_names(family: str, tensors: dict) -> dict:
  """Renames checkpoint keys to the rule names: strips `bert.`, adds `transformer.` to bare
  GPT-2 keys, maps the old LayerNorm gamma/beta, drops non-weight buffers."""
  out = {}
  for name, value in tensors.items():
    if any(p.search(name) for p in _IGNORED):
      continue
    name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
    name = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)
    if family == "bert" and name.startswith("bert."):
      name = name[len("bert."):]
    if family == "gpt2" and re.match(r"(wte|wpe|ln_f|h\.\d+)\.", name):
      name = "transformer." + name
    if name in out:
      raise HFCheckpointError(f"the checkpoint holds {name!r} twice (with and without a prefix)")
    out[name] = value
  return out


def _drop_tied(family: str, cfg: ModelConfig, tensors: dict) -> None:
  """Removes stored copies of tied weights after checking they are the same tensor."""
  ties = []
  if family == "gpt2" and cfg.tie_embeddings:
    ties.append(("lm_head.weight", "transformer.wte.weight"))
  if family in llama.FAMILIES and cfg.tie_embeddings:
    ties.append(("lm_head.weight", "model.embed_tokens.weight"))
  if family == "bert":
    ties += [("cls.predictions.decoder.weight", "embeddings.word_embeddings.weight"),
             ("cls.predictions.decoder.bias", "cls.predictions.bias")]
  for copy, source in ties:
    if copy in tensors:
      if source in tensors and np.array_equal(np.asarray(tensors[copy]), np.asarray(tensors[source])):
        del tensors[copy]
      else:
        raise HFCheckpointError(
            f"{copy} differs from {source}: bigmodel ties them (an untied "
            f"{'MLM decoder' if family == 'bert' else 'LM head'} is not supported"
            f"{'; set tie_word_embeddings=false in config.json to import it untied' if family != 'bert' else ''})")


# ---------------------------------------------------------------------------------------------
# Reading weights


def read_weights(model_dir: str, allow_pickle: bool = False) -> dict[str, np.ndarray]:
  """All tensors of a checkpoint directory as numpy arrays (safetensors, possibly sharded;
  pytorch_model.bin only with allow_pickle)."""
  from safetensors import safe_open

  def files_of(index_name: str, single: str) -> list[str] | None:
    index = storage.join(model_dir, index_name)
    if storage.exists(index):
      shards = sorted(set(storage.read_json(index)["weight_map"].values()))
      return [storage.join(model_dir, s) for s in shards]
    path = storage.join(model_dir, single)
    return [path] if storage.exists(path) else None

  tensors: dict[str, np.ndarray] = {}
  files = files_of(SAFETENSORS_INDEX, SAFETENSORS)
  if files:
    for path in files:
      if not storage.exists(path):
        raise HFCheckpointError(f"{path} is listed in {SAFETENSORS_INDEX} but does not exist")
      try:
        if storage.is_remote(path):    # read into memory: nothing lands on local disk
          from safetensors.numpy import load
          tensors.update(load(storage.read_bytes(path)))
          continue
        with safe_open(path, framework="numpy") as f:
          for name in f.keys():
            tensors[name] = f.get_tensor(name)
      except Exception as e:   # safetensors raises its own error types for bad headers
        raise HFCheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    return tensors
  files = files_of(PICKLE_INDEX, PICKLE)
  if files:
    if not allow_pickle:
      raise HFCheckpointError(
          f"{model_dir} has only {storage.basename(files[0])}, a pickle: loading a pickle can run "
          f"arbitrary code. Convert it to safetensors, or pass --allow_pickle (allow_pickle=True) "
          f"if you trust its source")
    try:
      import torch
    except ImportError:
      raise HFCheckpointError(f"reading {files[0]} needs PyTorch (pip install torch); "
                              f"safetensors checkpoints do not") from None
    for path in files:
      with storage.open(path, "rb") as f:
        state = torch.load(f, map_location="cpu", weights_only=True)
      for name, t in state.items():
        t = t.detach()
        tensors[name] = (t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy())
    return tensors
  others = [f for f in ("tf_model.h5", "flax_model.msgpack", "model.ckpt.index") if
            storage.exists(storage.join(model_dir, f))]
  raise HFCheckpointError(
      f"{model_dir} has a config.json but no {SAFETENSORS} (or {PICKLE})"
      + (f"; it has {others}, which bigmodel does not read: save the model with "
         f"transformers' save_pretrained to get safetensors" if others else ""))


# ---------------------------------------------------------------------------------------------
# Module and abstract params


def build_module(family: str, cfg: ModelConfig, heads=(), mesh=None):
  """The Flax module that holds a family's params: Decoder (GPT-2, Llama family) or Encoder (BERT)."""
  if family in DECODERS:
    from bigmodel.models.decoder import Decoder
    return Decoder(cfg, mesh)
  from bigmodel.models.encoder import Encoder
  return Encoder(cfg, mesh, heads=tuple(heads))


def abstract_params(module, boxed: bool = False):
  """Params as ShapeDtypeStructs (boxed: still carrying their logical axes)."""
  import jax
  import jax.numpy as jnp
  from flax import linen as nn
  ids = jnp.zeros((1, 2), jnp.int32)
  variables = jax.eval_shape(lambda: module.init(jax.random.key(0), ids))
  params = variables["params"]
  return params if boxed else nn.meta.unbox(params)


def param_shardings(module, mesh):
  """NamedShardings of a module's params from their logical axes (undividable dims unsharded)."""
  from flax import linen as nn
  from bigmodel import sharding
  boxed = abstract_params(module, boxed=True)
  return sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh, nn.meta.unbox(boxed))


def place_params(params, module, mesh):
  """Host numpy params -> global jax.Arrays with the module's shardings (each device reads
  only its shard, so this also works with several processes)."""
  import jax
  shardings = param_shardings(module, mesh)
  def put(a, s):
    a = np.asarray(a)
    return jax.make_array_from_callback(a.shape, s, lambda idx: a[idx])
  try:
    return jax.tree.map(put, params, shardings)
  except ValueError as e:
    raise HFCheckpointError(f"the params do not have the model's structure: {e}") from None


def _get(tree: dict, path: str):
  for part in path.split("/"):
    tree = tree[part]
  return tree


def _set(tree: dict, path: str, value) -> None:
  parts = path.split("/")
  for part in parts[:-1]:
    tree = tree.setdefault(part, {})
  tree[parts[-1]] = value


def _layer_path(cfg: ModelConfig, rule: Rule, i: int | None) -> str:
  if not rule.layer:
    return rule.path
  return f"blocks/layers/{rule.path}" if cfg.scan_layers else f"blocks/layer_{i}/{rule.path}"


def _rule_shapes(rule: Rule, bm_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
  import jax
  out = jax.eval_shape(rule.to_hf, jax.ShapeDtypeStruct(bm_shape, np.float32))
  return [tuple(o.shape) for o in out]


def _format_names(names, limit=8) -> str:
  names = sorted(names)
  return ", ".join(names[:limit]) + (f" ... ({len(names)} in all)" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------------
# Import


def convert_from_hf(hf: dict, tensors: dict[str, np.ndarray], *, scan_layers: bool = True,
                    source: str = "the checkpoint") -> HFModel:
  """An HF config dict and its tensors -> HFModel (checked: names, shapes, tied weights)."""
  family, arch, cfg = model_config(hf, scan_layers=scan_layers)
  bert_prefix = family == "bert" and any(n.startswith("bert.") for n in tensors)
  canonical = _canonical_names(family, {n: n for n in tensors})     # canonical -> file name
  shown = lambda n: canonical.get(n) or ("bert." + n if bert_prefix and not n.startswith("cls.") else n)
  tensors = _canonical_names(family, tensors)
  _drop_tied(family, cfg, tensors)
  rules = rules_for(family, cfg)
  # Which optional groups the checkpoint has: a group is all there or not at all.
  present = {r.group for r in rules if any(n in tensors for n in r.hf)}
  heads = tuple(h for h in ("mlm", "nsp") if h in present)
  required = {"trunk"} | set(BERT_REQUIRED_HEADS.get(arch, ())) | (
      {"lm_head"} if family in DECODERS and not cfg.tie_embeddings else set()) | (
      {"pooler"} if "nsp" in present else set())   # the NSP head reads the pooled output
  groups = present | required
  has_pooler = family == "bert" and "pooler" in present

  module = build_module(family, cfg, heads)
  abstract = abstract_params(module)
  expected: dict[str, tuple[Rule, int | None]] = {}
  for rule in rules:
    if rule.group not in groups:
      continue
    for i in (range(cfg.num_layers) if rule.layer else [None]):
      for name in rule.hf:
        expected[name.format(i=i)] = (rule, i)
  missing = sorted(set(expected) - set(tensors))
  extra = sorted(set(tensors) - set(expected))
  if missing or extra:
    msg = [f"the weights in {source} do not match a {arch} with this config.json "
           f"({cfg.num_layers} layers, d_model {cfg.d_model}):"]
    if missing:
      msg.append(f"  missing weights: {_format_names(map(shown, missing))}")
    if extra:
      msg.append(f"  unexpected weights: {_format_names(map(shown, extra))}")
    raise HFCheckpointError("\n".join(msg))

  params: dict = {}
  per_layer: dict[str, list] = {}
  for rule in rules:
    if rule.group not in groups:
      continue
    full = _get(abstract, _layer_path(cfg, rule, 0))
    bm_shape = tuple(full.shape[1:] if rule.layer and cfg.scan_layers else full.shape)
    want = _rule_shapes(rule, bm_shape)
    for i in (range(cfg.num_layers) if rule.layer else [None]):
      arrays = []
      for name, shape in zip(rule.hf, want):
        name = name.format(i=i)
        a = tensors[name]
        if tuple(a.shape) != shape:
          raise HFCheckpointError(
              f"shape mismatch for {shown(name)} in {source}: the checkpoint has {tuple(a.shape)}, "
              f"config.json implies {shape} (for bigmodel {_layer_path(cfg, rule, i)} "
              f"{bm_shape})")
        arrays.append(np.asarray(a, np.float32))
      value = np.ascontiguousarray(rule.to_bm(*arrays))
      if rule.layer and cfg.scan_layers:
        per_layer.setdefault(rule.path, []).append(value)
      else:
        _set(params, _layer_path(cfg, rule, i), value)
  for path, values in per_layer.items():
    _set(params, f"blocks/layers/{path}", np.stack(values))
  if family == "bert" and not has_pooler:
    # The Encoder always has a pooler: initialize it as HF would (normal(init_std), zero bias).
    rng = np.random.default_rng(0)
    _set(params, "pooler/kernel", (rng.standard_normal((cfg.d_model, cfg.d_model)) *
                                   cfg.init_std).astype(np.float32))
    _set(params, "pooler/bias", np.zeros((cfg.d_model,), np.float32))
  _check_tree(params, abstract)
  return HFModel(family, arch, cfg, params, heads, has_pooler if family == "bert" else False,
                 dict(hf))


def _check_tree(params, abstract) -> None:
  import jax
  got = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(params)}
  want = {jax.tree_util.keystr(p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(abstract)}
  if got != want:   # a bug in the rule tables, not in the user's checkpoint
    raise AssertionError(f"converted params differ from the model: missing "
                         f"{sorted(set(want) - set(got))}, extra {sorted(set(got) - set(want))}, "
                         f"shapes {[(k, got[k], want[k]) for k in got if k in want and got[k] != want[k]]}")


def read_hf(model_dir: str, *, allow_pickle: bool = False, scan_layers: bool = True) -> HFModel:
  """Imports an HF checkpoint directory (config.json + model.safetensors)."""
  hf = read_config(model_dir)
  model_config(hf)   # config errors before reading gigabytes of weights
  tensors = read_weights(model_dir, allow_pickle)
  return convert_from_hf(hf, tensors, scan_layers=scan_layers, source=model_dir)


# ---------------------------------------------------------------------------------------------
# Export


def convert_to_hf(model: HFModel) -> dict[str, np.ndarray]:
  """bigmodel params -> HF tensors named as `model.architecture` saves them."""
  import jax
  cfg = model.config
  groups = {"trunk", *model.heads}
  if model.family == "bert" and model.has_pooler:
    groups.add("pooler")
  if model.family in DECODERS and not cfg.tie_embeddings:
    groups.add("lm_head")
  params = jax.tree.map(np.asarray, model.params)
  out: dict[str, np.ndarray] = {}
  for rule in rules_for(model.family, cfg):
    if rule.group not in groups:
      continue
    for i in (range(cfg.num_layers) if rule.layer else [None]):
      try:
        value = _get(params, _layer_path(cfg, rule, i if i is not None else 0))
      except KeyError:
        raise HFCheckpointError(f"the params have no {_layer_path(cfg, rule, i)}: they are not "
                                f"those of a {model.family} model with this config") from None
      if rule.layer and cfg.scan_layers:
        value = value[i]
      for name, array in zip(rule.hf, rule.to_hf(value)):
        out[name.format(i=i)] = np.ascontiguousarray(array)
  if model.family == "bert" and model.architecture != "BertModel":
    out = {(n if n.startswith("cls.") else "bert." + n): v for n, v in out.items()}
  return out


def write_hf(model: HFModel, out_dir: str, tokenizer=None) -> list[str]:
  """Writes config.json + model.safetensors (+ the tokenizer's files); returns the paths."""
  from safetensors.numpy import save_file
  config = hf_config(model, tokenizer)
  tensors = convert_to_hf(model)
  storage.makedirs(out_dir)
  paths = [storage.join(out_dir, "config.json"), storage.join(out_dir, SAFETENSORS)]
  storage.write_json(paths[0], config, indent=2)
  if storage.is_remote(paths[1]):
    from safetensors.numpy import save
    storage.write_bytes(paths[1], save(tensors, metadata={"format": "pt"}))
  else:
    save_file(tensors, paths[1], metadata={"format": "pt"})
  if tokenizer is not None and hasattr(tokenizer, "kind"):
    tokenizer.save(out_dir)
    paths.append(storage.join(out_dir, "tokenizer.json"))
  elif tokenizer is not None:
    log.warning("the %s has no Hugging Face form (WordPiece or byte-level BPE): %s holds the "
                "model without tokenizer files", type(tokenizer).__name__, out_dir)
  return paths


def architecture_for(family: str, heads=()) -> str:
  """The HF architecture of a bigmodel model: GPT2LMHeadModel, LlamaForCausalLM (or Mistral,
  Qwen2), or the BERT form of its heads."""
  if family in llama.FAMILIES:
    return llama.FAMILIES[family]
  if family == "gpt2":
    return "GPT2LMHeadModel"
  if "mlm" in heads and "nsp" in heads:
    return "BertForPreTraining"
  return "BertForMaskedLM" if "mlm" in heads else "BertModel"
