"""int8 inference through qwix: post-training quantization of a trained or imported workdir.

    bigmodel quantize --workdir=W --out=W8 [--mode weight_only|dynamic]
    bigmodel evaluate --workdir=W8          # and predict, eval, sample, chat, serve

`quantize` restores W's latest params and writes W8: the int8 weights and their scales
(`int8/`, orbax), W's config.gin and tokenizer files, and `quant.json` (mode, source, sizes).
Nothing is retrained. Every command that restores a workdir for inference
(`loop.restore_for_inference`, `infer.restore.restore_decoder`) sees `quant.json` and gets the
qwix-wrapped model and its quantized params instead (`restore`).

What is quantized: the weight matmuls of attention (qkv, out), the MLP (wi, wi_gate, wo) and
the dense heads (pooler, classifier, MLM transform): symmetric int8 with one absmax scale per
output channel (qwix reads the channels off each einsum; scanned layers get per-layer scales).
Embedding tables (gathers, and the tied LM head that reads them) and norms stay float, as do
the attention products q.k and p.v (activation x activation): `_Provider` keeps them float.

Modes (qwix `PtqProvider` rules):
  weight_only  int8 weights, float activations: qwix dequantizes the weight inside the jitted
               call and the dot runs in f32. Smaller checkpoint; on XLA:CPU no faster.
  dynamic      int8 weights and per-token int8 activations (absmax scale computed on the fly,
               no calibration data): int8 x int8 -> int32 dots, then rescaled.

Why qwix and not aqtp: qwix 0.1.8 is installed and supports flax linen by intercepting
`jnp.einsum` inside the modules (`qwix.quantize_model`), so the models need no change; its
PTQ params are ordinary pytrees that jit, scan and orbax handle. aqtp needs its dot_general
injected into every einsum of the model code (and is not installed).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import linen as nn
from qwix._src.core import dot_general, qarray
from qwix._src.core import einsum as qeinsum
from qwix._src.providers import ptq
from qwix._src.utils import flax_util

from bigmodel import storage
from bigmodel.config import ConfigError
from bigmodel.models import layers

log = logging.getLogger(__name__)

RECORD = "quant.json"     # its name is also checked in loop.restore_for_inference, infer.restore
MODES = ("weight_only", "dynamic")
# Every module but the embeddings (a gather, and the tied LM head) and the root (an untied
# `lm_head` that the serving engine reads directly).
MODULE_PATH = r"(?!.*embed).+"
_SKIP_COPY = ("checkpoints", "checkpoints.bad", "int8", RECORD)


@flax.struct.dataclass
class QuantWeight(ptq.WithAux):
  """qwix's PTQ weight, whose same-dtype `astype` (the models cast weights to the compute
  dtype before each einsum) is a no-op instead of an error on the int8 array."""

  def astype(self, dtype):
    return self if jnp.dtype(dtype) == self.dtype else super().astype(dtype)


def _einsum_in_order(einsum_str: str, lhs, rhs):
  """qwix's einsum of an activation (lhs) and a weight (rhs), as one dot_general in that order.

  qwix's own `einsum` plans even a two-operand einsum with opt_einsum, which may swap the
  operands: 'bsd,df->bsf' becomes dot_general(weight, activation) -> [f, b, s] and a
  transpose. XLA:CPU then emits an int8 dot whose first operand is contracted on its leading
  axis, which YNNPACK does not take, so it runs in XLA's generic loop, many times slower than
  the same dot in this order (figures: README "Smaller, faster models")."""
  if "..." in einsum_str:      # '...d,df->...f' (the dense heads): name the leading axes
    ins, out = einsum_str.split("->")
    a, b = ins.split(",")
    if "..." in b:
      return qeinsum.einsum(einsum_str, lhs, rhs)
    free = [c for c in "abcdefghijklmnopqrstuvwxyz" if c not in einsum_str]
    lead = "".join(free[:len(lhs.shape) - len(a.replace("...", ""))])
    einsum_str = f"{a.replace('...', lead)},{b}->{out.replace('...', lead)}"
  one_row = isinstance(lhs, qarray.QArray) and _one_row_on_cpu(einsum_str, lhs)
  if one_row:       # the row twice (qvalue and its scale), the first copy of the result kept
    twice = lambda x: jnp.concatenate([x, x], axis=0)
    lhs = dataclasses.replace(lhs, qvalue=twice(lhs.qvalue), scale=twice(lhs.scale))
  res = qeinsum._perform_binary_einsum(lhs, rhs, einsum_str, dot_general.dot_general,
                                       preferred_element_type=None)
  if one_row:
    return jax.lax.slice_in_dim(res, 0, 1, axis=einsum_str.split("->")[1].index(einsum_str[0]))
  return res


def _one_row_on_cpu(einsum_str: str, lhs) -> bool:
  """An int8 dot with one activation row (batch-1 decode) on XLA:CPU, which YNNPACK leaves to
  the generic loop at one row and takes at two (figures: README "Smaller, faster models")."""
  a, out = einsum_str.split(",")[0], einsum_str.split("->")[1]
  rows = [n for c, n in zip(a, lhs.shape) if c in out]
  return layers.on_cpu(None) and a[0] in out and int(np.prod(rows)) == 1


class _Provider(qwix.PtqProvider):
  """PTQ whose einsums of two activations (attention's q.k and p.v) stay float: only the
  weight matmuls are quantized, as in PyTorch's dynamic quantization of Linear layers; each
  as one dot_general with the activation first (`_einsum_in_order`)."""

  def __init__(self, rules):
    super().__init__(rules, _einsum_fn=_einsum_in_order)

  def einsum(self, einsum_str, *operands, **kwargs):
    if len(operands) == 2 and not any(isinstance(o, ptq.WithAux) or flax_util.find_param(o)
                                      for o in operands):
      return jnp.einsum(einsum_str, *operands, **kwargs)
    return super().einsum(einsum_str, *operands, **kwargs)


def check_mode(mode: str) -> str:
  if mode not in MODES:
    raise ConfigError(f"unknown quantization mode {mode!r}: use one of {list(MODES)}")
  return mode


def wrap(model: nn.Module, mode: str) -> nn.Module:
  """The qwix-intercepted copy of `model` for int8 params of this mode."""
  rule = qwix.QuantizationRule(module_path=MODULE_PATH, weight_qtype=jnp.int8,
                               act_qtype=jnp.int8 if check_mode(mode) == "dynamic" else None)
  return qwix.quantize_model(model, _Provider([rule]))


def abstract_params(qmodel: nn.Module, model_args: tuple):
  """The quantized model's param tree (WithAux leaves where a weight is int8), abstract."""
  variables = jax.eval_shape(lambda: qmodel.init({"params": jax.random.key(0)}, *model_args,
                                                 deterministic=True))
  return nn.meta.unbox(variables["params"])


def _is_stacked(path: tuple) -> bool:
  return "layers" in path     # nn.scan's stacked layers: one scale set per layer


def quantize_params(params, abstract) -> Any:
  """float params -> the tree of `abstract` with each int8 weight a QuantWeight.

  qwix.quantize_params would apply a scanned layer's per-layer quantization (its channel axes)
  to the stacked [L, ...] array; vmap over the layer axis applies it per layer."""
  out = {}
  for path, w in flax.traverse_util.flatten_dict(nn.meta.unbox(params)).items():
    a = flax_util.get_value_from_path(abstract, path)
    if isinstance(a, ptq.WithAux):
      fn = lambda x, how=a.how: qarray.quantize(x, how)
      w = QuantWeight(array=(jax.vmap(fn) if _is_stacked(path) else fn)(w), how=a.how)
    out[path] = w
  return flax.traverse_util.unflatten_dict(out)


def _flat_arrays(qparams) -> dict[str, Any]:
  """'a/b/c' (float) or 'a/b/c.qvalue', 'a/b/c.scale' (int8 weight) -> array."""
  out = {}
  for path, v in flax.traverse_util.flatten_dict(qparams).items():
    key = "/".join(path)
    if isinstance(v, ptq.WithAux):
      out[key + ".qvalue"], out[key + ".scale"] = v.array.qvalue, v.array.scale
    else:
      out[key] = v
  return out


def _unflat(flat: dict, abstract) -> Any:
  out = {}
  for path, a in flax.traverse_util.flatten_dict(abstract).items():
    key = "/".join(path)
    if isinstance(a, ptq.WithAux):
      arr = qarray.QArray(qvalue=flat[key + ".qvalue"], scale=flat[key + ".scale"],
                          qtype=a.array.qtype)
      out[path] = QuantWeight(array=arr, how=a.how)
    else:
      out[path] = flat[key]
  return flax.traverse_util.unflatten_dict(out)


def nbytes(tree) -> int:
  return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def is_quantized(workdir: str) -> bool:
  return storage.exists(storage.join(workdir, RECORD))


def record(workdir: str) -> dict:
  return storage.read_json(storage.join(workdir, RECORD))


def _save(directory: str, flat: dict) -> None:
  import orbax.checkpoint as ocp
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(storage.epath(storage.absolute(directory)), flat)
  ckptr.wait_until_finished()


def _load(directory: str, abstract_flat: dict) -> dict:
  import orbax.checkpoint as ocp
  return ocp.StandardCheckpointer().restore(storage.epath(storage.absolute(directory)),
                                            abstract_flat)


def _dir_bytes(path: str) -> int:
  total = 0
  for name in storage.listdir(path):
    p = storage.join(path, name)
    total += _dir_bytes(p) if storage.isdir(p) else len(storage.read_bytes(p))
  return total


def _float_model(workdir: str, exp):
  """(model, float params, model_args, step) of a workdir's latest checkpoint."""
  from bigmodel.infer import restore as infer_restore
  if exp.train.objective in infer_restore.DECODER_OBJECTIVES:
    model, params, _, step = infer_restore.restore_decoder(workdir, exp, "quantize")
    return model, params, infer_restore.decoder_args(exp), step
  from bigmodel.train import loop
  comp, params, _, step = loop.restore_for_inference(workdir, exp)
  return comp.model, params, comp.objective.model_args(comp.example), step


def quantize(workdir: str, out: str, exp, mode: str = "dynamic") -> dict:
  """Writes `out`: the int8 params of `workdir`'s latest checkpoint, its config.gin and
  tokenizer, and quant.json; returns the summary (also stored in quant.json)."""
  check_mode(mode)
  if is_quantized(workdir):
    raise ConfigError(f"{workdir} is already quantized ({RECORD}): quantize its source instead")
  if storage.exists(storage.join(out, RECORD)) or storage.exists(storage.join(out, "int8")):
    raise ConfigError(f"{out} already holds a quantized model: choose a new --out")
  model, params, model_args, step = _float_model(workdir, exp)
  qparams = quantize_params(params, abstract_params(wrap(model, mode), model_args))
  storage.makedirs(out)
  for name in storage.listdir(workdir):          # config.gin, tokenizer files, import record
    src = storage.join(workdir, name)
    if name not in _SKIP_COPY and not storage.isdir(src):
      storage.copy(src, storage.join(out, name))
  _save(storage.join(out, "int8"), _flat_arrays(qparams))
  int8_weights = sum(int(np.prod(v.array.qvalue.shape)) for v in jax.tree.leaves(
      qparams, is_leaf=lambda x: isinstance(x, ptq.WithAux)) if isinstance(v, ptq.WithAux))
  summary = {"mode": mode, "source": storage.absolute(workdir), "step": int(step),
             "library": f"qwix {qwix.__version__}", "int8_weights": int8_weights,
             "params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(params))),
             "float_bytes": nbytes(params), "quantized_bytes": nbytes(qparams),
             "checkpoint_bytes": _dir_bytes(storage.join(out, "int8"))}
  storage.write_json(storage.join(out, RECORD), summary)
  return summary


def restore(workdir: str, model: nn.Module, model_args: tuple) -> tuple[nn.Module, Any, int]:
  """(the qwix-wrapped model, its int8 params, source step) of a `bigmodel quantize` workdir.
  `model` is the float model its config builds; `model_args` an example of its inputs."""
  rec = record(workdir)
  qmodel = wrap(model, rec["mode"])
  abstract = abstract_params(qmodel, model_args)
  abstract_flat = {k: jax.ShapeDtypeStruct(v.shape, v.dtype)
                   for k, v in _flat_arrays(abstract).items()}
  t0 = time.time()
  qparams = _unflat(_load(storage.join(workdir, "int8"), abstract_flat), abstract)
  log.info("restored %s int8 params (%s, from %s step %d) in %.1fs", workdir, rec["mode"],
           rec["source"], rec["step"], time.time() - t0)
  return qmodel, qparams, int(rec["step"])


def restore_components(workdir: str, comp):
  """`loop.Components` and params for a quantized workdir: the wrapped model, and replicated
  shardings for its params (their tree is not the float model's)."""
  from bigmodel import sharding
  qmodel, qparams, step = restore(workdir, comp.model, comp.objective.model_args(comp.example))
  rep = sharding.replicated(comp.mesh)
  state_sh = comp.state_sh.replace(params=jax.tree.map(lambda _: rep, qparams))
  return dataclasses.replace(comp, model=qmodel, state_sh=state_sh), qparams, step
