"""Parity with transformers: tiny random BERT and GPT-2 checkpoints, imported and run.

Bounds: max abs difference <= 5e-6 in float32 for hidden states and logits (the README's
figures, ~2e-6, measured here), with and without padding masks, on one device and on a
2x2x2 mesh; GPT-2 greedy generations identical; HF -> bigmodel -> HF bitwise-equal tensors.
"""

import jax
import numpy as np
import pytest
import torch
import transformers

import bigmodel
from bigmodel import config, pretrained, sharding
from bigmodel.interop import hf as hf_lib
from tests import interop_helpers as H

TOL = 5e-6     # what the README reports (measured 1.9e-6 to 2.6e-6)


@pytest.fixture(scope="module")
def gpt2_path(tmp_path_factory):
  return H.gpt2_dir(str(tmp_path_factory.mktemp("gpt2")))


@pytest.fixture(scope="module")
def gpt2(gpt2_path):
  return bigmodel.load_pretrained(gpt2_path), transformers.GPT2LMHeadModel.from_pretrained(gpt2_path).eval()


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
  return H.bert_dir(str(tmp_path_factory.mktemp("bert")), "BertForPreTraining")


def _gpt2_logits(ref, ids, mask=None, positions=None):
  with torch.no_grad():
    return ref(torch.tensor(ids), attention_mask=None if mask is None else torch.tensor(mask),
               position_ids=None if positions is None else torch.tensor(positions)).logits.numpy()


def test_gpt2_logits_match(gpt2):
  pre, ref = gpt2
  assert pre.architecture == "GPT2LMHeadModel" and pre.config.tie_embeddings
  ids, mask, _ = H.random_batch(pre.config.vocab_size)
  diff = H.max_diff(pre.apply(ids)["logits"], _gpt2_logits(ref, ids))
  diff_pad = H.max_diff(pre.apply(ids, mask)["logits"], _gpt2_logits(ref, ids, mask), valid=mask)
  print(f"GPT-2 logits max abs diff: {diff:.2e} (no mask), {diff_pad:.2e} (padding mask)")
  assert diff <= TOL and diff_pad <= TOL


def test_gpt2_left_padding_with_positions(gpt2):
  pre, ref = gpt2
  ids, mask, _ = H.random_batch(pre.config.vocab_size)
  left = mask[:, ::-1].copy()
  positions = np.maximum(np.cumsum(left, 1) - 1, 0)
  ours = pre.apply(ids, left, position_ids=positions)["logits"]
  assert H.max_diff(ours, _gpt2_logits(ref, ids, left, positions), valid=left) <= TOL


def test_gpt2_greedy_generation_identical(gpt2):
  pre, ref = gpt2
  prompts = np.random.default_rng(1).integers(0, pre.config.vocab_size, (2, 6))
  ours = pre.generate(prompts, 20)
  with torch.no_grad():
    theirs = ref.generate(torch.tensor(prompts), attention_mask=torch.ones(prompts.shape, dtype=torch.long),
                          max_new_tokens=20, do_sample=False, pad_token_id=0).numpy()
  np.testing.assert_array_equal(ours, theirs)


def test_gpt2_round_trip_bitwise(gpt2_path, tmp_path):
  pre = bigmodel.load_pretrained(gpt2_path)
  pre.to_hf(str(tmp_path))
  H.assert_bitwise_equal(H.tensors_of(gpt2_path), H.tensors_of(str(tmp_path)))
  back = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
  ids, _, _ = H.random_batch(pre.config.vocab_size)
  np.testing.assert_array_equal(_gpt2_logits(back, ids),
                                _gpt2_logits(transformers.GPT2LMHeadModel.from_pretrained(gpt2_path).eval(), ids))


def test_gpt2_untied_head_and_unrolled_layers(tmp_path):
  path = H.gpt2_dir(str(tmp_path / "hf"), tie=False, seed=3)
  pre = bigmodel.load_pretrained(path, scan_layers=False)
  assert not pre.config.tie_embeddings and "layer_1" in pre.params["blocks"]
  ref = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
  ids, mask, _ = H.random_batch(pre.config.vocab_size)
  assert H.max_diff(pre.apply(ids, mask)["logits"], _gpt2_logits(ref, ids, mask), valid=mask) <= TOL
  pre.to_hf(str(tmp_path / "out"))
  H.assert_bitwise_equal(H.tensors_of(path), H.tensors_of(str(tmp_path / "out")))


def _bert_outputs(ref, ids, mask, types):
  kw = dict(attention_mask=None if mask is None else torch.tensor(mask),
            token_type_ids=torch.tensor(types))
  with torch.no_grad():
    base = ref.bert if hasattr(ref, "bert") else ref
    out = base(torch.tensor(ids), **kw)
    result = {"last_hidden_state": out.last_hidden_state.numpy()}
    if out.pooler_output is not None:
      result["pooler_output"] = out.pooler_output.numpy()
    if isinstance(ref, transformers.BertForPreTraining):
      heads = ref(torch.tensor(ids), **kw)
      result["logits"] = heads.prediction_logits.numpy()
      result["seq_relationship_logits"] = heads.seq_relationship_logits.numpy()
    elif isinstance(ref, transformers.BertForMaskedLM):
      result["logits"] = ref(torch.tensor(ids), **kw).logits.numpy()
  return result


def _compare_bert(pre, ref, label):
  ids, mask, types = H.random_batch(pre.config.vocab_size)
  worst = {}
  for m in (None, mask):
    ours = pre.apply(ids, m, types)
    theirs = _bert_outputs(ref, ids, m, types)
    assert sorted(ours) == sorted(theirs)
    for k in theirs:
      per_token = ours[k].ndim == 3
      d = H.max_diff(ours[k], theirs[k], valid=m if (per_token and m is not None) else None)
      worst[k] = max(worst.get(k, 0.0), d)
  print(f"{label} max abs diff (with and without padding): " +
        ", ".join(f"{k} {v:.2e}" for k, v in sorted(worst.items())))
  assert all(v <= TOL for v in worst.values()), worst


def test_bert_pretraining_heads_match(bert_path):
  pre = bigmodel.load_pretrained(bert_path)
  assert pre.architecture == "BertForPreTraining" and pre.heads == ("mlm", "nsp") and pre.has_pooler
  assert pre.config.mlp == "gelu_exact" and pre.config.norm_eps == 1e-12 and not pre.config.pre_norm
  _compare_bert(pre, transformers.BertForPreTraining.from_pretrained(bert_path), "BERT")


def test_bert_round_trip_bitwise(bert_path, tmp_path):
  pre = bigmodel.load_pretrained(bert_path)
  pre.to_hf(str(tmp_path))
  H.assert_bitwise_equal(H.tensors_of(bert_path), H.tensors_of(str(tmp_path)))
  back = transformers.BertForPreTraining.from_pretrained(str(tmp_path))
  _compare_bert(pre, back, "BERT exported")


@pytest.mark.parametrize("arch,pooler", [("BertForMaskedLM", False), ("BertModel", True),
                                         ("BertModel", False)])
def test_bert_other_architectures(tmp_path, arch, pooler):
  path = H.bert_dir(str(tmp_path / "hf"), arch, pooler=pooler, seed=5)
  pre = bigmodel.load_pretrained(path, scan_layers=arch != "BertModel")
  assert pre.architecture == arch and pre.has_pooler == pooler
  assert pre.heads == (("mlm",) if arch == "BertForMaskedLM" else ())
  kw = {"add_pooling_layer": False} if arch == "BertModel" and not pooler else {}
  _compare_bert(pre, getattr(transformers, arch).from_pretrained(path, **kw), arch)
  pre.to_hf(str(tmp_path / "out"))
  H.assert_bitwise_equal(H.tensors_of(path), H.tensors_of(str(tmp_path / "out")))


def test_bert_tanh_gelu(tmp_path):
  path = H.bert_dir(str(tmp_path), "BertForMaskedLM", hidden_act="gelu_new", seed=2)
  pre = bigmodel.load_pretrained(path)
  assert pre.config.mlp == "gelu"
  _compare_bert(pre, transformers.BertForMaskedLM.from_pretrained(path), "BERT gelu_new")


def test_params_land_on_the_mesh_with_model_shardings(bert_path):
  mesh = sharding.make_mesh(config.MeshConfig(data=2, fsdp=2, tensor=2))
  with jax.set_mesh(mesh):
    pre = bigmodel.load_pretrained(bert_path)
  assert pre.mesh is mesh or pre.mesh == mesh
  qkv = pre.params["blocks"]["layers"]["attn"]["qkv"]       # [L, d, 3, h, k]: (layers, embed, qkv, heads, kv)
  assert qkv.sharding.mesh == mesh
  assert tuple(qkv.sharding.spec)[:4] == (None, "fsdp", None, "tensor")
  wi = pre.params["blocks"]["layers"]["mlp"]["wi"]     # d_ff 37 does not divide: unsharded there
  assert tuple(wi.sharding.spec) == (None, "fsdp", None)
  want = pretrained.param_shardings(pre.module, mesh)
  for got, expected in zip(jax.tree.leaves(pre.params), jax.tree.leaves(want)):
    assert got.sharding == expected
  _compare_bert(pre, transformers.BertForPreTraining.from_pretrained(bert_path), "BERT on a 2x2x2 mesh")


def test_pickle_checkpoint_needs_allow_pickle(bert_path, tmp_path):
  ref = transformers.BertForPreTraining.from_pretrained(bert_path)
  import shutil
  shutil.copy(f"{bert_path}/config.json", tmp_path / "config.json")
  torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
  with pytest.raises(hf_lib.HFCheckpointError, match="pickle.*allow_pickle"):
    bigmodel.load_pretrained(str(tmp_path))
  pre = bigmodel.load_pretrained(str(tmp_path), allow_pickle=True)
  safe = hf_lib.read_hf(bert_path)
  for a, b in zip(jax.tree.leaves(pre.hf_model().params), jax.tree.leaves(safe.params)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_bigmodel_native_model_exports_to_transformers(tmp_path, family):
  """A model made in bigmodel (no HF config to start from) is written as HF loads it."""
  bert = family == "bert"
  cfg = config.ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=48, max_len=24,
                           pre_norm=not bert, mlp="gelu_exact" if bert else "gelu",
                           norm_eps=1e-12 if bert else 1e-5)
  heads = ("mlm", "nsp") if bert else ()
  module = hf_lib.build_module(family, cfg, heads)
  params = module.init(jax.random.key(0), np.zeros((1, 4), np.int32))["params"]
  params = jax.tree.map(lambda p: np.asarray(p) + np.random.default_rng(p.size).normal(0, 0.1, p.shape)
                        .astype(np.float32), nn_unbox(params))
  arch = hf_lib.architecture_for(family, heads)
  model = hf_lib.HFModel(family, arch, cfg, params, heads, has_pooler=bert)
  hf_lib.write_hf(model, str(tmp_path))
  pre = bigmodel.load_pretrained(str(tmp_path))
  assert pre.architecture == arch and pre.config == cfg
  if bert:
    _compare_bert(pre, transformers.BertForPreTraining.from_pretrained(str(tmp_path)), "native BERT")
  else:
    ids, mask, _ = H.random_batch(64)
    ref = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path)).eval()
    assert H.max_diff(pre.apply(ids, mask)["logits"], _gpt2_logits(ref, ids, mask), valid=mask) <= TOL


def nn_unbox(tree):
  from flax import linen as nn
  return nn.meta.unbox(tree)
