"""`bigmodel.load_pretrained(path)`: a pretrained model, ready to run, from a Hugging Face
checkpoint directory or a bigmodel workdir.

    import bigmodel
    m = bigmodel.load_pretrained("path/to/all-MiniLM-L6-v2")     # or a `bigmodel train` workdir
    batch = m.tokenizer.batch(["A sentence.", "Another one."])
    out = m.apply(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    out["last_hidden_state"]      # [b, s, d] (encoders); out["logits"] where there is an LM head

The params are placed with the model's shardings (its declared logical axes through the
rule table in `bigmodel.sharding`) on `mesh`: the one passed, else the mesh set with
`jax.set_mesh`, else all devices on the data axis.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from flax import linen as nn

from bigmodel import sharding, storage
from bigmodel.config import MeshConfig, ModelConfig
from bigmodel.interop import hf as hf_lib
from bigmodel.interop.hf import param_shardings, place_params

__all__ = ["load_pretrained", "Pretrained", "PretrainedError", "default_mesh",
           "param_shardings", "place_params"]


class PretrainedError(ValueError):
  pass


def default_mesh(mesh=None):
  if mesh is not None:
    return mesh
  active = jax.sharding.get_mesh()
  if not getattr(active, "empty", True):
    return active
  return sharding.make_mesh(MeshConfig())



@dataclasses.dataclass
class Pretrained:
  """A pretrained model on a mesh. `apply` runs it; `to_hf` exports it."""
  family: str                # 'bert' | 'gpt2' | 'llama' | 'mistral' | 'qwen2'
  architecture: str          # the Hugging Face architecture it corresponds to
  config: ModelConfig
  params: Any                # sharded jax.Arrays
  tokenizer: Any             # bigmodel tokenizer (WordPiece / byte-level BPE / ...), or None
  mesh: Any
  heads: tuple[str, ...] = ()
  has_pooler: bool = False
  hf_config: dict = dataclasses.field(default_factory=dict)
  step: int | None = None    # the checkpoint step, for bigmodel workdirs

  def __post_init__(self):
    self.module = hf_lib.build_module(self.family, self.config, self.heads, self.mesh)
    self._forward = jax.jit(self._run)

  @property
  def model(self):
    return self.module

  def _run(self, params, ids, mask, types, positions):
    if self.family in hf_lib.DECODERS:
      logits = self.module.apply({"params": params}, ids, positions, mask, deterministic=True)
      return {"logits": logits}
    out = self.module.apply({"params": params}, ids, types, mask, deterministic=True)
    result = {"last_hidden_state": out["hidden"]}
    if self.has_pooler:
      result["pooler_output"] = out["pooled"]
    if "mlm_logits" in out:
      result["logits"] = out["mlm_logits"]
    if "nsp_logits" in out:
      result["seq_relationship_logits"] = out["nsp_logits"]
    return result

  def apply(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None) -> dict:
    """Runs the model on int [b, s] inputs (1 for real tokens, 0 for padding in the mask).

    Returns a dict of arrays: `last_hidden_state` [b, s, d] and `pooler_output` [b, d]
    (encoders), `logits` [b, s, v] (the LM or MLM head), `seq_relationship_logits` [b, 2]
    (BERT's NSP head). GPT-2 positions count from 0 at the first column, as in
    transformers; pass `position_ids` for left-padded rows.
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length]; got shape {ids.shape}")
    b, s = ids.shape
    if s > self.config.max_len:
      raise ValueError(f"{s} tokens exceed the model's {self.config.max_len} positions")
    ones = np.ones_like(ids)
    mask = ones if attention_mask is None else np.asarray(attention_mask)
    types = np.zeros_like(ids) if token_type_ids is None else np.asarray(token_type_ids)
    positions = (np.broadcast_to(np.arange(s), ids.shape) if position_ids is None
                 else np.asarray(position_ids))
    for name, a in (("attention_mask", mask), ("token_type_ids", types), ("position_ids", positions)):
      if a.shape != ids.shape:
        raise ValueError(f"{name} has shape {a.shape}, input_ids {ids.shape}")
    # The batch is split over the data axes: pad it to a multiple of their size.
    ways = sharding.batch_size_per(self.mesh)
    padded = -(-b // ways) * ways
    batch_sh = sharding.batch_sharding(self.mesh)
    def put(a):
      a = np.concatenate([a, np.zeros((padded - b, s), a.dtype)]) if padded > b else a
      return jax.device_put(np.ascontiguousarray(a, np.int32), batch_sh)
    out = self._forward(self.params, put(ids), put(mask), put(types), put(positions))
    return {k: v[:b] for k, v in out.items()}

  def generate(self, input_ids, max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
               seed: int = 0) -> np.ndarray:
    """Continues each row of int [b, s] prompts by `max_new_tokens` tokens (greedy at
    temperature 0); returns [b, s + max_new_tokens]. Recomputes the window every step."""
    if self.family not in hf_lib.DECODERS:
      raise ValueError(f"generate needs a decoder; this is a {self.architecture}")
    from bigmodel.infer.sample import sample_logits
    ids = np.asarray(input_ids, np.int32)
    if ids.ndim != 2:
      raise ValueError(f"input_ids must be [batch, length]; got shape {ids.shape}")
    b, s = ids.shape
    total = s + max_new_tokens
    if total > self.config.max_len:
      raise ValueError(f"{s} + {max_new_tokens} tokens exceed the model's {self.config.max_len} "
                       f"positions")
    buf = np.zeros((b, total), np.int32)
    buf[:, :s] = ids
    mask = np.ones_like(buf)
    rng = jax.random.key(seed)
    for i in range(s, total):
      logits = self.apply(buf, mask)["logits"][:, i - 1]
      buf[:, i] = np.asarray(sample_logits(logits, jax.random.fold_in(rng, i), temperature, top_k))
    return buf

  def hf_model(self) -> hf_lib.HFModel:
    params = jax.tree.map(lambda a: np.asarray(jax.device_get(a)), self.params)
    return hf_lib.HFModel(self.family, self.architecture, self.config, params, self.heads,
                          self.has_pooler, self.hf_config)

  def to_hf(self, out_dir: str) -> list[str]:
    """Writes config.json + model.safetensors (+ tokenizer files) that transformers loads."""
    return hf_lib.write_hf(self.hf_model(), out_dir, self.tokenizer)


def _is_hf_dir(path: str) -> bool:
  return storage.exists(storage.join(path, "config.json"))


def _is_workdir(path: str) -> bool:
  return storage.exists(storage.join(path, "config.gin")) and storage.isdir(
      storage.join(path, "checkpoints"))


def load_pretrained(path: str, *, mesh=None, allow_pickle: bool = False,
                    scan_layers: bool = True) -> Pretrained:
  """A Hugging Face checkpoint directory (config.json + model.safetensors: BertModel,
  BertForMaskedLM, BertForPreTraining, GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM,
  Qwen2ForCausalLM) or a bigmodel workdir (config.gin +
  checkpoints/, e.g. written by `bigmodel train` or `bigmodel convert from-hf`)."""
  path = os.fspath(path)
  if not storage.isdir(path):
    raise PretrainedError(f"{path!r} is not a directory: pass a Hugging Face checkpoint "
                          f"directory or a bigmodel workdir")
  mesh = default_mesh(mesh)
  if _is_hf_dir(path):
    return _from_hf(path, mesh, allow_pickle, scan_layers)
  if _is_workdir(path):
    return _from_workdir(path, mesh)
  raise PretrainedError(f"{path!r} is neither a Hugging Face checkpoint (no config.json) nor a "
                        f"bigmodel workdir (no config.gin and checkpoints/)")


def _from_hf(path, mesh, allow_pickle, scan_layers) -> Pretrained:
  from bigmodel.data import hf_tokenizers
  model = hf_lib.read_hf(path, allow_pickle=allow_pickle, scan_layers=scan_layers)
  module = hf_lib.build_module(model.family, model.config, model.heads, mesh)
  params = place_params(model.params, module, mesh)
  tokenizer = hf_tokenizers.load(path) if hf_tokenizers.has_files(path) else None
  return Pretrained(model.family, model.architecture, model.config, params, tokenizer, mesh,
                    model.heads, model.has_pooler, model.hf_config)


def _from_workdir(path, mesh) -> Pretrained:
  """Restores only the params of the latest checkpoint (any optimizer)."""
  import orbax.checkpoint as ocp
  from bigmodel import config as config_lib
  from bigmodel.data import tokenizers
  from bigmodel.train.checkpoint import CheckpointError

  gin_path = storage.join(path, "config.gin")
  exp = config_lib.load([], [storage.read_text(gin_path)]) if storage.is_remote(gin_path) else \
      config_lib.load([gin_path])
  cfg = exp.model
  ckpt_dir = storage.absolute(storage.join(path, "checkpoints"))
  record = {}
  record_path = storage.join(path, "hf_import.json")
  if storage.exists(record_path):
    record = storage.read_json(record_path)
  manager = ocp.CheckpointManager(storage.epath(ckpt_dir), item_handlers={
      "state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()})
  try:
    step = manager.latest_step()
    if step is None:
      raise CheckpointError(f"no checkpoint in {ckpt_dir}")
    stored = manager.item_metadata(step)["state"]
    stored_params = getattr(stored, "tree", stored)["params"]
    keys = set(stored_params)
    if "type_embed" in keys:
      family = "bert"
      heads = tuple(h for h in ("mlm", "nsp") if h in keys)
    else:
      family, heads = hf_lib.llama.family_of(cfg) or "gpt2", ()
      if family == "llama" and record.get("family") == "mistral":   # the same model, by config
        family = "mistral"
    module = hf_lib.build_module(family, cfg, heads, mesh)
    boxed = hf_lib.abstract_params(module, boxed=True)
    abstract = nn.meta.unbox(boxed)
    want = set(abstract)
    if keys != want:
      raise CheckpointError(
          f"the params in {ckpt_dir} (top-level {sorted(keys)}) are not those of a "
          f"{'BERT encoder' if family == 'bert' else 'GPT decoder'} ({sorted(want)}): "
          f"load_pretrained reads GPT-2-, Llama- and BERT-shaped models")
    shardings = sharding.logical_to_sharding(nn.get_partition_spec(boxed), mesh, abstract)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s), shardings)
    try:
      restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item={"params": target}, restore_args={"params": restore_args}, partial_restore=True)))
    except Exception as e:
      raise CheckpointError(f"could not restore the params of {ckpt_dir} step {step}: {e}") from None
  finally:
    manager.close()
  params = restored["state"]["params"]
  arch = record.get("architecture") if record.get("family") == family else None
  if arch is None or (family == "bert" and set(hf_lib.BERT_REQUIRED_HEADS[arch]) - {"pooler"}
                      - set(heads)):
    arch = hf_lib.architecture_for(family, heads)
  has_pooler = bool(record.get("has_pooler", True)) if family == "bert" else False
  try:
    tokenizer = tokenizers.load(path)
  except (FileNotFoundError, ValueError):
    tokenizer = None
  return Pretrained(family, arch, cfg, params, tokenizer, mesh, heads, has_pooler,
                    record.get("hf_config", {}) if record.get("family") == family else {}, step)
