"""`bigmodel evaluate` and `bigmodel predict` for fine-tuned task models: the latest
checkpoint of a workdir over a file, with the field's metrics.

    evaluate(workdir, exp, eval_file="")  -> a metrics dict (JSON-serializable)
    predict(workdir, exp, input_file)     -> one JSON-serializable dict per input example

Both dispatch on TrainConfig.objective through HANDLERS: objective -> (evaluate, predict),
each with the signature above. Sequence classification lives here:
    evaluate -> {"accuracy", "macro_f1", "examples", ...}
    predict  -> [{"label", "score", "text"}...] per input row

The label set is the run's: ClassificationConfig.labels, else inferred again from its train file
(the same rule as training, so ids agree).
"""

from __future__ import annotations

import json

import jax
import numpy as np

from bigmodel import storage
from bigmodel.data import finetune as ft_data
from bigmodel.data import readers
from bigmodel.data.sources import DataError
from bigmodel.evaluation import metrics
from bigmodel.train import loop


def _handler(exp):
  if exp.train.objective not in HANDLERS:
    raise DataError(f"evaluate/predict support the objectives {sorted(HANDLERS)}; this run's is "
                    f"{exp.train.objective!r} (use `bigmodel eval` for validation loss)")
  return HANDLERS[exp.train.objective]


def evaluate(workdir: str, exp, eval_file: str = "") -> dict:
  return _handler(exp)[0](workdir, exp, eval_file)


def predict(workdir: str, exp, input_file: str) -> list[dict]:
  return _handler(exp)[1](workdir, exp, input_file)


def label_set(cfg) -> readers.LabelSet:
  if cfg.labels:
    return readers.LabelSet(tuple(cfg.labels))
  if not cfg.files:
    raise DataError("the run names no train file (DataConfig.files) to infer its labels from; "
                    "set ClassificationConfig.labels")
  path = readers.resolve(cfg.files[0], cfg.data_dir)
  _, labels = readers.read_classification(path, cfg.text_columns, cfg.label_column, cfg.column_names)
  return readers.LabelSet.infer(labels)


def _is_decoder(exp) -> bool:
  return exp.train.objective == "decoder_classification"


def _probabilities(comp, params, table: ft_data.Table, batch_size: int) -> np.ndarray:
  apply = jax.jit(lambda p, ids, seg, mask: jax.nn.softmax(
      comp.model.apply({"params": p}, ids, seg, mask, deterministic=True), axis=-1))
  n = len(table)
  out = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size) % n     # a fixed shape: pad the last batch
    probs = apply(params, table.input_ids[idx], table.segment_ids[idx], table.input_mask[idx])
    out.append(np.asarray(jax.device_get(probs))[: min(batch_size, n - start)])
  return np.concatenate(out)


def evaluate_classification(workdir: str, exp, eval_file: str = "") -> dict:
  cfg = exp.task_data
  path = readers.resolve(eval_file or (cfg.val_files[0] if cfg.val_files else ""), cfg.data_dir)
  if not path:
    raise DataError("no eval file: pass --eval_file or set DataConfig.val_files")
  comp, params, tokenizer, step = loop.restore_for_inference(workdir, exp)
  labels = label_set(cfg)
  table = ft_data.load_eval(cfg, tokenizer, labels, path, decoder=_is_decoder(exp))
  probs = _probabilities(comp, params, table, exp.train.batch_size)
  pred = probs.argmax(-1)
  gold = table.labels
  nll = -np.log(np.maximum(probs[np.arange(len(gold)), gold], 1e-12))
  return {"step": step, "file": path, "examples": int(len(gold)), "truncated": table.truncated,
          "accuracy": metrics.accuracy(list(gold), list(pred)),
          "macro_f1": metrics.macro_f1(list(gold), list(pred)),
          "loss": float(nll.mean())}


def predict_classification(workdir: str, exp, input_file: str) -> list[dict]:
  cfg = exp.task_data
  comp, params, tokenizer, _ = loop.restore_for_inference(workdir, exp)
  labels = label_set(cfg)
  path = readers.resolve(input_file, cfg.data_dir)
  texts = ft_data.read_texts(cfg, path)
  table = ft_data.encode(tokenizer, texts, cfg.seq_len, _is_decoder(exp))
  probs = _probabilities(comp, params, table, exp.train.batch_size)
  return [{"text": list(t) if len(t) > 1 else t[0], "label": labels.names[int(p.argmax())],
           "score": float(p.max())} for t, p in zip(texts, probs)]


def _evaluate_qa(workdir: str, exp, eval_file: str = "") -> dict:
  from bigmodel.evaluation import qa
  return qa.evaluate_qa(workdir, exp, eval_file)


def _predict_qa(workdir: str, exp, input_file: str) -> list[dict]:
  from bigmodel.evaluation import qa
  return qa.predict_qa(workdir, exp, input_file)


def _evaluate_ner(workdir: str, exp, eval_file: str = "") -> dict:
  from bigmodel.evaluation import ner
  return ner.evaluate_ner(workdir, exp, eval_file)


def _predict_ner(workdir: str, exp, input_file: str) -> list[dict]:
  from bigmodel.evaluation import ner
  return ner.predict_ner(workdir, exp, input_file)


def _evaluate_prompted(workdir: str, exp, eval_file: str = "") -> dict:
  from bigmodel.evaluation import prompted
  return prompted.evaluate_prompted(workdir, exp, eval_file)


def _predict_prompted(workdir: str, exp, input_file: str) -> list[dict]:
  from bigmodel.evaluation import prompted
  return prompted.predict_prompted(workdir, exp, input_file)


def _evaluate_recsys(workdir: str, exp, eval_file: str = "") -> dict:
  from bigmodel.evaluation import recsys
  return recsys.evaluate_recsys(workdir, exp, eval_file)


def _predict_recsys(workdir: str, exp, input_file: str) -> list[dict]:
  from bigmodel.evaluation import recsys
  return recsys.predict_recsys(workdir, exp, input_file)


# objective -> (evaluate, predict). Task modules add their entry here.
HANDLERS = {
    "classification": (evaluate_classification, predict_classification),
    "decoder_classification": (evaluate_classification, predict_classification),
    "distill": (evaluate_classification, predict_classification),     # a distilled student
    "qa": (_evaluate_qa, _predict_qa),
    "token_classification": (_evaluate_ner, _predict_ner),
    "prompted_lm": (_evaluate_prompted, _predict_prompted),
    "sasrec": (_evaluate_recsys, _predict_recsys),
    "bert4rec": (_evaluate_recsys, _predict_recsys),
}


def write_json(obj, path: str) -> None:
  storage.write_json(path, obj)


def write_jsonl(rows, path: str) -> None:
  with storage.open(path, "w") as f:     # a local file's directory is made
    for r in rows:
      f.write(json.dumps(r) + "\n")
