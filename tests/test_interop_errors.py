"""Bad input gets a clear error naming the problem."""

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import bigmodel
from bigmodel import config, pretrained
from bigmodel.interop import hf as hf_lib
from tests import interop_helpers as H


@pytest.fixture(scope="module")
def bert_src(tmp_path_factory):
  return H.bert_dir(str(tmp_path_factory.mktemp("bert")), "BertForPreTraining")


@pytest.fixture(scope="module")
def gpt2_src(tmp_path_factory):
  return H.gpt2_dir(str(tmp_path_factory.mktemp("gpt2")))


@pytest.fixture
def bert_copy(bert_src, tmp_path):
  path = tmp_path / "bert"
  shutil.copytree(bert_src, path)
  return path


def _edit_config(path, **changes):
  cfg = json.loads((path / "config.json").read_text())
  cfg.update(changes)
  (path / "config.json").write_text(json.dumps(cfg))


def _edit_weights(path, fn):
  tensors = load_file(str(path / "model.safetensors"))
  fn(tensors)
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_not_a_directory(tmp_path):
  with pytest.raises(pretrained.PretrainedError, match="is not a directory"):
    bigmodel.load_pretrained(str(tmp_path / "nope"))
  with pytest.raises(hf_lib.HFCheckpointError, match="is not a directory"):
    hf_lib.read_hf(str(tmp_path / "nope"))


def test_directory_that_is_not_an_hf_checkpoint(tmp_path):
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(hf_lib.HFCheckpointError, match="not a Hugging Face checkpoint: it has no config.json"):
    hf_lib.read_hf(str(tmp_path))
  with pytest.raises(pretrained.PretrainedError, match="neither a Hugging Face checkpoint"):
    bigmodel.load_pretrained(str(tmp_path))


def test_config_without_weights(bert_copy):
  (bert_copy / "model.safetensors").unlink()
  (bert_copy / "tf_model.h5").write_bytes(b"")
  with pytest.raises(hf_lib.HFCheckpointError, match="no model.safetensors.*tf_model.h5"):
    hf_lib.read_hf(str(bert_copy))


@pytest.mark.parametrize("changes,pattern", [
    ({"model_type": "roberta", "architectures": ["RobertaModel"]}, "unsupported model_type 'roberta'"),
    ({"architectures": ["BertForSequenceClassification"]},
     "unsupported architecture 'BertForSequenceClassification'"),
    ({"hidden_act": "relu"}, "unsupported config field hidden_act='relu'"),
    ({"position_embedding_type": "relative_key"},
     "unsupported config field position_embedding_type='relative_key'"),
    ({"is_decoder": True}, "unsupported config field is_decoder=True"),
    ({"hidden_size": 30}, "hidden size 30 is not divisible by 4 attention heads"),
])
def test_unsupported_bert_config(bert_copy, changes, pattern):
  _edit_config(bert_copy, **changes)
  with pytest.raises(hf_lib.HFCheckpointError, match=pattern):
    hf_lib.read_hf(str(bert_copy))


@pytest.mark.parametrize("changes,pattern", [
    ({"activation_function": "relu"}, "unsupported config field activation_function='relu'"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx"),
    ({"architectures": ["GPT2ForSequenceClassification"]}, "unsupported architecture"),
])
def test_unsupported_gpt2_config(gpt2_src, tmp_path, changes, pattern):
  path = tmp_path / "gpt2"
  shutil.copytree(gpt2_src, path)
  _edit_config(path, **changes)
  with pytest.raises(hf_lib.HFCheckpointError, match=pattern):
    hf_lib.read_hf(str(path))


def test_config_missing_a_field_or_bad_weights_file(bert_copy):
  cfg = json.loads((bert_copy / "config.json").read_text())
  del cfg["hidden_size"]
  (bert_copy / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(hf_lib.HFCheckpointError, match="config.json has no 'hidden_size'"):
    hf_lib.read_hf(str(bert_copy))
  cfg["hidden_size"] = 32
  (bert_copy / "config.json").write_text(json.dumps(cfg))
  (bert_copy / "model.safetensors").write_bytes(b"not a safetensors file")
  with pytest.raises(hf_lib.HFCheckpointError, match="not a readable safetensors file"):
    hf_lib.read_hf(str(bert_copy))


def test_missing_weights(bert_copy):
  _edit_weights(bert_copy, lambda t: t.pop("bert.encoder.layer.1.attention.self.key.weight"))
  with pytest.raises(hf_lib.HFCheckpointError,
                     match=r"missing weights: bert\.encoder\.layer\.1\.attention\.self\.key\.weight"):
    hf_lib.read_hf(str(bert_copy))


def test_missing_head_of_the_architecture(bert_copy):
  _edit_weights(bert_copy, lambda t: [t.pop(k) for k in list(t) if k.startswith("cls.seq_relationship")])
  with pytest.raises(hf_lib.HFCheckpointError, match=r"BertForPreTraining.*\n.*missing weights: "
                     r"cls\.seq_relationship\.bias, cls\.seq_relationship\.weight"):
    hf_lib.read_hf(str(bert_copy))


def test_extra_weights(bert_copy):
  def add(t):
    t["bert.encoder.layer.2.output.dense.weight"] = np.zeros((32, 37), np.float32)
    t["classifier.weight"] = np.zeros((3, 32), np.float32)
  _edit_weights(bert_copy, add)
  with pytest.raises(hf_lib.HFCheckpointError, match=r"unexpected weights: "
                     r"bert\.encoder\.layer\.2\.output\.dense\.weight, classifier\.weight"):
    hf_lib.read_hf(str(bert_copy))


def test_shape_mismatch(bert_copy):
  _edit_weights(bert_copy, lambda t: t.update({"bert.encoder.layer.0.intermediate.dense.weight":
                                               np.zeros((40, 32), np.float32)}))
  with pytest.raises(hf_lib.HFCheckpointError, match=r"shape mismatch for bert\.encoder\.layer\.0\."
                     r"intermediate\.dense\.weight.*\(40, 32\).*implies \(37, 32\)"):
    hf_lib.read_hf(str(bert_copy))


def test_config_and_weights_disagree(bert_copy):
  _edit_config(bert_copy, num_hidden_layers=3)
  with pytest.raises(hf_lib.HFCheckpointError, match=r"3 layers.*\n.*missing weights: bert\.encoder\.layer\.2\."):
    hf_lib.read_hf(str(bert_copy))


def test_untied_mlm_decoder_is_refused(bert_copy):
  def untie(t):
    t["cls.predictions.decoder.weight"] = t["bert.embeddings.word_embeddings.weight"] + 1
  _edit_weights(bert_copy, untie)
  with pytest.raises(hf_lib.HFCheckpointError, match="cls.predictions.decoder.weight differs"):
    hf_lib.read_hf(str(bert_copy))


def test_tied_copies_and_old_names_are_accepted(bert_copy):
  def legacy(t):
    t["cls.predictions.decoder.weight"] = t["bert.embeddings.word_embeddings.weight"].copy()
    t["bert.embeddings.position_ids"] = np.arange(40, dtype=np.int64)[None]
    t["bert.embeddings.LayerNorm.gamma"] = t.pop("bert.embeddings.LayerNorm.weight")
  _edit_weights(bert_copy, legacy)
  hf_lib.read_hf(str(bert_copy))


def test_export_refuses_what_hf_cannot_hold(gpt2_src):
  model = hf_lib.read_hf(gpt2_src)
  import dataclasses
  rope = dataclasses.replace(model, config=dataclasses.replace(model.config, positions="rope"))
  with pytest.raises(hf_lib.HFCheckpointError, match="positions='rope'"):
    hf_lib.hf_config(rope)
  swiglu = dataclasses.replace(model, config=config.ModelConfig(
      **{**dataclasses.asdict(model.config), "mlp": "swiglu", "use_bias": False}))
  with pytest.raises(hf_lib.HFCheckpointError, match="mlp='swiglu'.*use_bias=False"):
    hf_lib.hf_config(swiglu)
