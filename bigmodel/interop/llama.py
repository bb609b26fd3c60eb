"""Hugging Face Llama-family decoders (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM)
in bigmodel's Decoder: config mapping and the weight-name rules used by `bigmodel.interop.hf`.

The three differ only by config: RoPE (half-split pairing, base `rope_theta`), RMSNorm,
SwiGLU, pre-norm, grouped-query attention (`num_key_value_heads` -> ModelConfig.num_kv_heads),
tied or untied embeddings; Qwen2 adds biases on q/k/v (ModelConfig.qkv_bias), Mistral a
sliding window. What bigmodel cannot reproduce exactly is refused with HFCheckpointError:
RoPE scaling (rope_type other than 'default', as Llama 3.1's 'llama3'), Llama's
attention_bias (which also biases o_proj) and mlp_bias, an activation other than silu. A
sliding window shorter than max_position_embeddings becomes ModelConfig.max_len (bigmodel
attends fully; within the window that is the same).

Names (nn.Linear kernels are [out, in]):
    embed/embedding          model.embed_tokens.weight            [v, d]
    blocks/../attn/qkv       q_proj, k_proj, v_proj .weight       [d, 3, h, k]  (g == h)
    blocks/../attn/q, kv     q_proj; k_proj, v_proj .weight       [d, h, k]; [d, 2, g, k]
    blocks/../attn/out       o_proj.weight                        [h, k, d]
    blocks/../mlp/wi_gate, wi, wo   gate_proj, up_proj, down_proj [d, f], [d, f], [f, d]
    blocks/../ln1, ln2       input_layernorm, post_attention_layernorm
    final_norm, lm_head      model.norm, lm_head.weight (untied)  [d, v]
"""

from __future__ import annotations

import logging

import numpy as np

from bigmodel.config import ModelConfig

log = logging.getLogger(__name__)

FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
            "qwen2": "Qwen2ForCausalLM"}


def _rope_theta(hf: dict, error) -> float:
  """RoPE base from transformers 5's `rope_parameters` or the older `rope_theta`/`rope_scaling`."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
  if kind != "default":
    raise error(f"unsupported RoPE scaling rope_type={kind!r}: bigmodel supports plain RoPE "
                f"(rope_type 'default'; Llama 3.1's 'llama3' scaling is not implemented)")
  return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def model_config(family: str, hf: dict, error) -> dict:
  """ModelConfig fields of a Llama/Mistral/Qwen2 config.json (error: the exception class)."""
  d, h = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  g = int(hf.get("num_key_value_heads") or h)
  k = int(hf.get("head_dim") or 0) or d // h
  if not hf.get("head_dim") and d % h:
    raise error(f"hidden size {d} is not divisible by {h} attention heads (and no head_dim)")
  if h % g:
    raise error(f"num_attention_heads={h} is not a multiple of num_key_value_heads={g}")
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    raise error(f"unsupported config field hidden_act={act!r}: bigmodel's SwiGLU uses silu")
  for name in ("attention_bias", "mlp_bias"):
    if family == "llama" and hf.get(name):
      raise error(f"unsupported config field {name}=True: bigmodel has biases only on q/k/v "
                  f"(Qwen2's form), not on o_proj or the MLP")
  max_len = int(hf.get("max_position_embeddings", 2048))
  window = hf.get("sliding_window")
  if family == "qwen2" and not hf.get("use_sliding_window", False):
    window = None
  if window and int(window) < max_len:
    log.warning("sliding_window=%s < max_position_embeddings=%d: bigmodel attends over the "
                "whole context, the same within the window; ModelConfig.max_len = %s",
                window, max_len, window)
    max_len = int(window)
  return dict(vocab_size=int(hf["vocab_size"]), d_model=d, num_layers=int(hf["num_hidden_layers"]),
              num_heads=h, num_kv_heads=0 if g == h else g, head_dim=0 if k * h == d else k,
              d_ff=int(hf["intermediate_size"]), max_len=max_len,
              dropout=float(hf.get("attention_dropout", 0.0)), positions="rope",
              rope_theta=_rope_theta(hf, error), norm="rmsnorm", mlp="swiglu", pre_norm=True,
              use_bias=False, qkv_bias=family == "qwen2",
              tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
              norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
              init_std=float(hf.get("initializer_range", 0.02)))


def config_problems(family: str, cfg: ModelConfig) -> list[str]:
  """What keeps `cfg` from being written as this family's HF config (empty: nothing)."""
  problems = []
  for name, want in (("positions", "rope"), ("norm", "rmsnorm"), ("mlp", "swiglu")):
    if getattr(cfg, name) != want:
      problems.append(f"{name}={getattr(cfg, name)!r} (HF {family} has {want})")
  if not cfg.pre_norm:
    problems.append("pre_norm=False (HF Llama-family models are pre-norm)")
  if cfg.use_bias:
    problems.append("use_bias=True (HF Llama-family models have no output or MLP biases)")
  if cfg.qkv_bias != (family == "qwen2"):
    problems.append(f"qkv_bias={cfg.qkv_bias} (q/k/v biases are Qwen2's: "
                    f"{'it has them' if family == 'qwen2' else 'use Qwen2ForCausalLM'})")
  return problems


def hf_fields(family: str, cfg: ModelConfig) -> dict:
  """The structural config.json fields of a ModelConfig (transformers 5 names)."""
  out = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.mlp_dim,
             num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
             num_key_value_heads=cfg.kv_heads, head_dim=cfg.dim_per_head,
             max_position_embeddings=cfg.max_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
             rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
             tie_word_embeddings=cfg.tie_embeddings, attention_dropout=cfg.dropout)
  if family == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  if family == "qwen2":
    out.update(use_sliding_window=False)
  return out


def rules(cfg: ModelConfig, rule_cls, copy, transpose) -> list:
  """The Rule table (see hf.Rule) of a Llama-family decoder with this config."""
  d, h, g, k = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head
  L = "model.layers.{i}."
  A = L + "self_attn."
  heads = lambda w, n: w.T.reshape(d, n, k)               # [n k, d] -> [d, n, k]
  flat = lambda w: w.reshape(d, -1).T                     # [d, n, k] -> [n k, d]
  R = lambda path, hf, to_bm, to_hf, **kw: rule_cls(path, hf, to_bm, to_hf, layer=True, **kw)
  out = [rule_cls("embed/embedding", ("model.embed_tokens.weight",), *copy()),
         rule_cls("final_norm/scale", ("model.norm.weight",), *copy()),
         R("ln1/scale", (L + "input_layernorm.weight",), *copy()),
         R("ln2/scale", (L + "post_attention_layernorm.weight",), *copy())]
  names = tuple(A + f"{p}_proj.weight" for p in "qkv")
  biases = tuple(A + f"{p}_proj.bias" for p in "qkv")
  if g == h:
    out.append(R("attn/qkv", names, lambda q, kk, v: np.stack([heads(q, h), heads(kk, h),
                                                               heads(v, h)], axis=1),
                 lambda x: tuple(flat(x[:, n]) for n in range(3))))
    if cfg.qkv_bias:
      out.append(R("attn/qkv_bias", biases, lambda *bs: np.stack([b.reshape(h, k) for b in bs]),
                   lambda x: tuple(x[n].reshape(h * k) for n in range(3))))
  else:
    out.append(R("attn/q", names[:1], lambda q: heads(q, h), lambda x: (flat(x),)))
    out.append(R("attn/kv", names[1:], lambda kk, v: np.stack([heads(kk, g), heads(v, g)], axis=1),
                 lambda x: (flat(x[:, 0]), flat(x[:, 1]))))
    if cfg.qkv_bias:
      out.append(R("attn/q_bias", biases[:1], lambda b: b.reshape(h, k),
                   lambda x: (x.reshape(h * k),)))
      out.append(R("attn/kv_bias", biases[1:], lambda kb, vb: np.stack([kb.reshape(g, k),
                                                                         vb.reshape(g, k)]),
                   lambda x: (x[0].reshape(g * k), x[1].reshape(g * k))))
  out += [R("attn/out", (A + "o_proj.weight",), lambda x: x.T.reshape(h, k, d),
            lambda x: (x.reshape(h * k, d).T,)),
          R("mlp/wi_gate", (L + "mlp.gate_proj.weight",), *transpose()),
          R("mlp/wi", (L + "mlp.up_proj.weight",), *transpose()),
          R("mlp/wo", (L + "mlp.down_proj.weight",), *transpose())]
  if not cfg.tie_embeddings:
    out.append(rule_cls("lm_head", ("lm_head.weight",), *transpose(), group="lm_head"))
  return out


def family_of(cfg: ModelConfig) -> str | None:
  """The HF family a bigmodel decoder config is written as: qwen2 (q/k/v biases), llama
  (RoPE + RMSNorm + SwiGLU), or None (GPT-2-shaped)."""
  if cfg.positions == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu":
    return "qwen2" if cfg.qkv_bias else "llama"
  return None
