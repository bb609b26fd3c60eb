"""Llama-style decoders: grouped-query attention (training math, KV cache, engine, sharding),
the Llama size presets, and Hugging Face Llama / Mistral / Qwen2 in and out.

Bounds (the README's figures, measured here): GQA against multi-head attention with the
key/value heads repeated 1e-6; cached decoding against the full forward 1e-5 with identical
greedy tokens; logits against transformers 5e-6 (float32).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from bigmodel import config, sharding
from bigmodel.config import ModelConfig
from bigmodel.infer import decode
from bigmodel.models.decoder import Decoder

LLAMA = dict(vocab_size=61, d_model=48, num_layers=2, num_heads=6, head_dim=8, d_ff=40,
             positions="rope", rope_theta=5000.0, norm="rmsnorm", mlp="swiglu", use_bias=False,
             tie_embeddings=False, max_len=64)


def _tokens(shape, vocab=61, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


def _init(cfg, seed=0):
  return nn.meta.unbox(Decoder(cfg).init(jax.random.key(seed), _tokens((1, 8)))["params"])


def test_num_kv_heads_must_divide_num_heads():
  with pytest.raises(config.ConfigError, match="num_kv_heads=4 must divide num_heads=6"):
    ModelConfig(**{**LLAMA, "num_kv_heads": 4})
  assert ModelConfig(**LLAMA).kv_heads == 6 and ModelConfig(**LLAMA, num_kv_heads=1).kv_heads == 1


def _as_multi_head(gqa_params, cfg):
  """The multi-head params that compute what a GQA model computes: each key/value head
  repeated for the h / g query heads that read it, in the fused [d, 3, h, k] layout."""
  r = cfg.num_heads // cfg.kv_heads
  params = jax.tree.map(np.asarray, gqa_params)
  attn = params["blocks"]["layers"]["attn"]
  kv = np.repeat(attn.pop("kv"), r, axis=3)                       # L d 2 g k -> L d 2 h k
  attn["qkv"] = np.concatenate([attn.pop("q")[:, :, None], kv], axis=2)
  return params


def test_grouped_attention_equals_multi_head_with_repeated_heads(g=2):
  cfg = ModelConfig(**LLAMA, num_kv_heads=g)
  params = _init(cfg)
  attn = params["blocks"]["layers"]["attn"]
  assert attn["q"].shape == (2, 48, 6, 8) and attn["kv"].shape == (2, 48, 2, g, 8)
  assert "qkv" not in attn
  tokens = _tokens((2, 16))
  segments = jnp.asarray([[1] * 10 + [2] * 6, [1] * 12 + [0] * 4])   # packed docs, padding
  run = lambda m, p: jax.jit(m.apply)({"params": p}, tokens, segment_ids=segments)   # one compile
  ours = run(Decoder(cfg), params)
  mha = dataclasses.replace(cfg, num_kv_heads=0)
  theirs = run(Decoder(mha), _as_multi_head(params, cfg))
  diff = float(jnp.max(jnp.abs(ours - theirs)))
  print(f"GQA g={g} vs repeated-head MHA: max abs diff {diff:.1e}")
  assert diff <= 1e-6


def test_gqa_cache_holds_kv_heads_and_decodes_as_the_full_forward():
  cfg = ModelConfig(**LLAMA, num_kv_heads=2)
  model, params = Decoder(cfg), _init(cfg, seed=1)
  cache = nn.meta.unbox(decode.init_cache(model, 2, 24))
  assert cache["blocks"]["layers"]["attn"]["cached_key"].shape == (2, 2, 24, 2, 8)   # L b t g k
  prompts = [[5, 9, 2, 7, 1, 3], [4, 4, 8, 1, 2, 6]]
  out = decode.Generator(model, params, bucket=8)(prompts, 10)
  forward = jax.jit(lambda t: model.apply({"params": params}, t))
  # Greedy identical: the full forward over prompt + generated text predicts every new token.
  for p, c in zip(prompts, out):
    assert len(c.tokens) == 10
    full = forward(jnp.asarray([p + c.tokens], jnp.int32))[0]
    assert np.array_equal(np.argmax(full[len(p) - 1:-1], -1), c.tokens)
  # Logits: a prefill then one-token steps on the cache against the full forward.
  text = jnp.asarray([prompts[0] + out[0].tokens], jnp.int32)
  full = forward(text)
  run = jax.jit(lambda c, t: model.apply({"params": params, "cache": c}, t, decode=True,
                                         mutable=["cache"]))
  logits, state = run(nn.meta.unbox(decode.init_cache(model, 1, 24)), text[:, :6])
  steps = [logits]
  for i in range(6, text.shape[1]):
    logits, state = run(state["cache"], text[:, i:i + 1])
    steps.append(logits)
  diff = float(jnp.max(jnp.abs(jnp.concatenate(steps, 1) - full)))
  print(f"GQA cached decode vs full forward: max abs diff {diff:.1e}")
  assert diff <= 1e-5


def test_mqa_engine_matches_generator():
  from bigmodel.infer.engine import Engine, SamplingParams
  cfg = ModelConfig(**LLAMA, num_kv_heads=1)
  model, params = Decoder(cfg), _init(cfg, seed=2)
  engine = Engine(model, params, slots=2, max_len=32, chunk_sizes=(8,), page=8)
  assert all(a.shape[-2] == 1 for p, a in jax.tree_util.tree_leaves_with_path(engine.cache)
             if "cached" in jax.tree_util.keystr(p))
  prompts = [[3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [2, 7, 1, 8]]
  want = decode.Generator(model, params, bucket=8)(prompts, 8)
  engine.start()
  try:
    got = [engine.generate(p, SamplingParams(max_tokens=8), timeout=120).tokens for p in prompts]
    again = engine.generate(prompts[0] + want[0].tokens[:3], SamplingParams(max_tokens=5),
                            timeout=120)    # reuses the first request's stored pages
  finally:
    engine.stop()
  assert got == [c.tokens for c in want]
  assert again.tokens == want[0].tokens[3:] and again.prefilled < len(prompts[0]) + 3


def test_kv_heads_shard_over_tensor_where_they_divide_it():
  from bigmodel.interop.hf import param_shardings
  cfg = ModelConfig(**{**LLAMA, "num_heads": 4, "head_dim": 12}, num_kv_heads=2)
  model = Decoder(cfg)
  for tensor, spec in ((2, "tensor"), (4, None)):
    mesh = sharding.make_mesh(config.MeshConfig(data=-1, tensor=tensor))
    kv = param_shardings(Decoder(cfg, mesh), mesh)["blocks"]["layers"]["attn"]["kv"]
    assert kv.spec[3] == spec, (tensor, kv.spec)       # layers embed 2 g k
  params = _init(cfg)
  tokens = _tokens((2, 16))
  want = jax.jit(model.apply)({"params": params}, tokens)
  mesh = sharding.make_mesh(config.MeshConfig(data=2, tensor=4))   # g = 2 does not divide 4
  sharded = Decoder(cfg, mesh)
  got = jax.jit(lambda p, t: sharded.apply({"params": p}, t))(
      jax.device_put(params, param_shardings(sharded, mesh)), tokens)
  assert float(jnp.max(jnp.abs(got - want))) <= 1e-5


# --------------------------------------------------------------------------- Hugging Face

TOL = 5e-6     # what the README reports (measured 2.4e-7 to 4.8e-7)


def _write_tokenizer(directory, sentencepiece=False):
  """A tiny Llama-style tokenizer.json: byte-level BPE (Llama 3) or SentencePiece-style BPE
  with a metaspace pre-tokenizer (Llama 2, Mistral); <s> prepended by the template."""
  import json
  import os
  from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
  from tokenizers import trainers
  from tests.interop_helpers import CORPUS
  specials = ["<unk>", "<s>", "</s>"]
  if sentencepiece:
    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    alphabet = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials + alphabet,
                                  show_progress=False)
  else:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(CORPUS, trainer)
  tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                     special_tokens=[("<s>", 1)])
  os.makedirs(directory, exist_ok=True)
  tok.save(os.path.join(directory, "tokenizer.json"))
  with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
               "eos_token": "</s>", "unk_token": "<unk>"}, f)
  return tok.get_vocab_size()


def _hf_dir(directory, arch, *, kv_heads=2, head_dim=12, tie=False, sentencepiece=False, seed=0):
  """A random 2-layer HF `arch` (d 48, 6 query heads) with its tokenizer, saved to directory."""
  import torch
  import transformers
  from tests.interop_helpers import randomize
  vocab = _write_tokenizer(directory, sentencepiece)
  config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
  kw = dict(vocab_size=vocab, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=kv_heads, max_position_embeddings=64,
            rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, rms_norm_eps=1e-5,
            tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
  if head_dim:
    kw["head_dim"] = head_dim
  torch.manual_seed(seed)
  randomize(getattr(transformers, arch)(config_cls(**kw)), seed).save_pretrained(directory)
  return directory


def _check_against_transformers(path, arch, tokenizer=True):
  """Logits (with and without padding), 10 greedy tokens and the tokenizer against
  transformers; returns the loaded model and the logits difference."""
  import torch
  import transformers
  import bigmodel
  from tests import interop_helpers as H
  pre = bigmodel.load_pretrained(path)
  ref = getattr(transformers, arch).from_pretrained(path).eval()
  assert pre.architecture == arch
  ids, mask, _ = H.random_batch(pre.config.vocab_size)
  with torch.no_grad():
    theirs = ref(torch.tensor(ids)).logits.numpy()
    theirs_pad = ref(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  diff = max(H.max_diff(pre.apply(ids)["logits"], theirs),
             H.max_diff(pre.apply(ids, mask)["logits"], theirs_pad, valid=mask))
  print(f"{arch} {pre.config.num_heads}/{pre.config.kv_heads} heads: max abs diff {diff:.1e}")
  assert diff <= TOL
  prompts = np.random.default_rng(1).integers(3, pre.config.vocab_size, (2, 6))
  with torch.no_grad():
    want = ref.generate(torch.tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                        max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None).numpy()
  np.testing.assert_array_equal(pre.generate(prompts, 10), want)
  if tokenizer:
    _check_tokenizer(path, pre.tokenizer)
  return pre, diff


def _check_tokenizer(path, ours):
  import transformers
  hf_tok = transformers.AutoTokenizer.from_pretrained(path)
  for text in ("Hello world! It's naïve café, 北京.", "  two  spaces\tand a tab"):
    ids = hf_tok(text).input_ids
    assert ours.encode(text, add_special_tokens=True) == ids
    assert ours.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


def test_llama_gqa_untied_matches_transformers_both_ways(tmp_path):
  from tests import interop_helpers as H
  path = _hf_dir(str(tmp_path / "hf"), "LlamaForCausalLM")
  pre, _ = _check_against_transformers(path, "LlamaForCausalLM")
  cfg = pre.config
  assert (cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.tie_embeddings) == (2, 12, 5000.0, False)
  assert pre.tokenizer.eos_id == 2 and pre.tokenizer.bos_id == 1
  pre.to_hf(str(tmp_path / "out"))
  H.assert_bitwise_equal(H.tensors_of(path), H.tensors_of(str(tmp_path / "out")))


@pytest.fixture(scope="module")
def qwen2_path(tmp_path_factory):
  return _hf_dir(str(tmp_path_factory.mktemp("qwen2")), "Qwen2ForCausalLM", kv_heads=6,
                 head_dim=0, tie=True, seed=1)


def test_qwen2_tied_multi_head_with_qkv_biases(qwen2_path):
  """(transformers 5 rebuilds Qwen2's tokenizer pipeline in code, not from tokenizer.json, so
  the tiny tokenizer here is not compared; see the SentencePiece test.)"""
  pre, _ = _check_against_transformers(qwen2_path, "Qwen2ForCausalLM", tokenizer=False)
  attn = pre.params["blocks"]["layers"]["attn"]
  assert {"qkv", "qkv_bias"} <= set(attn) and pre.config.tie_embeddings and not pre.config.use_bias


@pytest.mark.slow
def test_convert_workdir_round_trip(qwen2_path, tmp_path):
  """`bigmodel convert from-hf` then `to-hf` (in process): a workdir, and back to the same
  tensors and tokenizer."""
  from bigmodel.data import tokenizers
  from bigmodel.interop import workdir
  from tests import interop_helpers as H
  path = qwen2_path
  workdir.from_hf(path, str(tmp_path / "work"))
  assert "ModelConfig.qkv_bias = True" in (tmp_path / "work" / "config.gin").read_text()
  assert tokenizers.load(str(tmp_path / "work")).kind == "json"
  summary = workdir.to_hf(str(tmp_path / "work"), str(tmp_path / "out"))
  assert summary["architecture"] == "Qwen2ForCausalLM"
  H.assert_bitwise_equal(H.tensors_of(path), H.tensors_of(str(tmp_path / "out")))


def test_sentencepiece_tokenizer_json(tmp_path):
  from bigmodel.data import hf_tokenizers, tokenizers
  _write_tokenizer(str(tmp_path), sentencepiece=True)
  ours = hf_tokenizers.load(str(tmp_path))
  assert ours.kind == "json" and (ours.bos_id, ours.eos_id) == (1, 2)
  _check_tokenizer(str(tmp_path), ours)
  ours.save(str(tmp_path / "saved"))          # a workdir's copy reads back the same
  again = tokenizers.load(str(tmp_path / "saved"))
  assert again.encode("naïve café", add_special_tokens=True) == ours.encode("naïve café", True)


def test_mistral_and_llama_configs():
  import transformers
  from bigmodel.interop import hf as hf_lib
  mistral = transformers.MistralConfig(vocab_size=100, hidden_size=64, num_attention_heads=8,
                                       num_key_value_heads=2, head_dim=16, sliding_window=32,
                                       max_position_embeddings=128).to_dict()
  mistral["architectures"] = ["MistralForCausalLM"]
  family, arch, cfg = hf_lib.model_config(mistral)
  assert (family, cfg.kv_heads, cfg.head_dim, cfg.max_len) == ("mistral", 2, 16, 32)
  llama = transformers.LlamaConfig(vocab_size=100, hidden_size=64, num_attention_heads=8).to_dict()
  llama["architectures"] = ["LlamaForCausalLM"]
  assert hf_lib.model_config({**llama, "rope_theta": 500000.0, "rope_parameters": None})[2].rope_theta == 500000.0
  with pytest.raises(hf_lib.HFCheckpointError, match="rope_type='llama3'"):
    hf_lib.model_config({**llama, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}})
  with pytest.raises(hf_lib.HFCheckpointError, match="attention_bias=True"):
    hf_lib.model_config({**llama, "attention_bias": True})


@pytest.mark.parametrize("size,params", [("llama3_8b", 8.03e9), ("llama3_70b", 70.55e9)])
def test_llama3_presets_parse(size, params):
  exp = config.load(["experiments/runs/pretrain_llama.gin", f"experiments/sizes/{size}.gin"],
                    ["BATCH_SIZE=256", "SEQ_LEN=4096"])
  cfg = exp.model
  assert (cfg.kv_heads, cfg.vocab_size, cfg.rope_theta, cfg.dtype) == (8, 128256, 500000.0, "bfloat16")
  shapes = jax.eval_shape(lambda: Decoder(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  n = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(nn.meta.unbox(shapes["params"])))
  assert abs(n - params) < 0.005e9, n
