"""`bigmodel evaluate` / `bigmodel predict` for token classification (NER).

    evaluate_ner(workdir, exp, eval_file="") -> {"f1", "precision", "recall" (entity level,
        conlleval semantics, in [0, 1]), "per_type": {type: {precision, recall, f1, support}},
        "token_accuracy" (over all words), "loss" (mean over kept words), "sentences",
        "words", "truncated_sentences", "truncated_words", "step", "file"}
    predict_ner(workdir, exp, input_file) -> [{"tokens": [...], "tags": [...]}] per sentence
        (plus "gold" when a CoNLL input has tags, "truncated_words" when some were cut)

Tags map back to the input words: a word's tag is the prediction at its first sub-word.
Words past the row length (`NerConfig.ner_eval_seq_len`, else seq_len) get "O" and count
in the metrics as such (a gold entity there is missed, never dropped).

The tag set is the run's (bigmodel.data.ner.tag_set: NerConfig.labels, else the TFDS
names, else inferred again from its train file, the same rule as training).
"""

from __future__ import annotations

import jax
import numpy as np

from bigmodel.data import ner as ner_data
from bigmodel.data import readers
from bigmodel.data.sources import DataError
from bigmodel.evaluation import metrics
from bigmodel.train import loop


def log_probs(comp, params, table: ner_data.TagTable, batch_size: int) -> np.ndarray:
  """float32 [n, s, c] log-probabilities of every row (0 past a row's length).

  Rows run sorted by length, each batch cut to the smallest power-of-two multiple of 16
  that holds its longest row (a few compiled shapes, little padding)."""
  apply = jax.jit(lambda p, ids, mask: jax.nn.log_softmax(
      comp.model.apply({"params": p}, ids, None, mask, deterministic=True), axis=-1))
  n, s = table.input_ids.shape
  lengths = table.input_mask.sum(-1)
  order = np.argsort(lengths, kind="stable")
  out = None
  for start in range(0, n, batch_size):
    idx = order[np.arange(start, start + batch_size) % n]   # a fixed batch: wrap the last one
    width = 16
    while width < lengths[idx].max():
      width *= 2
    width = min(width, s)
    lp = np.asarray(jax.device_get(apply(params, table.input_ids[idx, :width],
                                         table.input_mask[idx, :width])))
    if out is None:
      out = np.zeros((n, s, lp.shape[-1]), np.float32)
    real = min(batch_size, n - start)
    out[idx[:real], :width] = lp[:real]
  return out


def word_tags(table: ner_data.TagTable, lp: np.ndarray, names: tuple[str, ...]) -> list[list[str]]:
  """Per sentence, one tag per word: the first sub-word's argmax; "O" past truncation."""
  if "O" not in names:
    raise DataError(f"the tag set {list(names)} has no 'O' to give truncated words")
  out = []
  for r, (first, n) in enumerate(zip(table.first, table.num_words)):
    pred = [names[int(i)] for i in lp[r, first].argmax(-1)] if len(first) else []
    out.append(pred + ["O"] * (int(n) - len(first)))
  return out


def evaluate_ner(workdir: str, exp, eval_file: str = "") -> dict:
  cfg = exp.task_data
  comp, params, tokenizer, step = loop.restore_for_inference(workdir, exp)
  tags = ner_data.tag_set(cfg)
  _, val_path = ner_data.train_files(cfg)
  path = readers.resolve(eval_file, cfg.data_dir) if eval_file else val_path
  if path:
    table = ner_data.load_eval(cfg, tokenizer, tags, path)
    gold = table.gold
  elif cfg.tfds_name:
    sentences, _ = ner_data.read_tfds(cfg, cfg.ner_tfds_eval_split)
    path = f"TFDS {cfg.tfds_name} {cfg.ner_tfds_eval_split}"
    gold = [t for _, t in sentences]
    table = ner_data.encode(tokenizer, [w for w, _ in sentences], cfg.ner_eval_seq_len or cfg.seq_len,
                            ner_data.tag_ids(tags, sentences, path))
  else:
    raise DataError("no eval file: pass --eval_file or set DataConfig.val_files (or tfds_name)")
  lp = log_probs(comp, params, table, exp.train.batch_size)
  pred = word_tags(table, lp, tags.names)
  scores = metrics.entity_f1(gold, pred)
  flat_gold = [t for s in gold for t in s]
  flat_pred = [t for s in pred for t in s]
  kept = table.labels >= 0
  nll = -np.take_along_axis(lp, np.maximum(table.labels, 0)[..., None], -1)[..., 0][kept]
  return {"step": step, "file": path, "f1": scores["f1"], "precision": scores["precision"],
          "recall": scores["recall"], "per_type": scores["per_type"],
          "token_accuracy": metrics.accuracy(flat_gold, flat_pred),
          "loss": float(nll.mean()) if nll.size else 0.0,
          "sentences": len(gold), "words": len(flat_gold),
          "truncated_sentences": table.truncated, "truncated_words": table.truncated_words,
          "row_length": int(table.input_ids.shape[1])}


def predict_ner(workdir: str, exp, input_file: str) -> list[dict]:
  cfg = exp.task_data
  comp, params, tokenizer, _ = loop.restore_for_inference(workdir, exp)
  tags = ner_data.tag_set(cfg)
  path = readers.resolve(input_file, cfg.data_dir)
  words, gold = ner_data.read_words(path, cfg)
  keep = [i for i, w in enumerate(words) if w]
  table = ner_data.encode(tokenizer, [words[i] for i in keep], cfg.ner_eval_seq_len or cfg.seq_len)
  pred = word_tags(table, log_probs(comp, params, table, exp.train.batch_size), tags.names)
  out = []
  for r, i in enumerate(keep):
    row = {"tokens": words[i], "tags": pred[r]}
    if gold is not None:
      row["gold"] = gold[i]
    cut = int(table.num_words[r]) - len(table.first[r])
    if cut:
      row["truncated_words"] = cut
    out.append(row)
  return out
