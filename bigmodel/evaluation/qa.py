"""Extractive QA decoding, `bigmodel evaluate` and `bigmodel predict` (objective `qa`).

    decode(features, records, start_logits [n, s], end_logits [n, s], n_best_size, max_answer_len)
        -> per record, its n-best answers [{"text", "start", "end", "logit", "probability"}...],
           best first ([] when no window offers a valid span)

Decoding, as run_squad.py's write_predictions: in each window, the n_best_size highest start
and end logits among context tokens; a span (s, e) is valid when s <= e, e - s + 1 <=
max_answer_len and s is a token this window gives its maximum context (the sliding window's
rule). Its score is start_logit[s] + end_logit[e]. The windows of a question pool their spans;
each maps back through the tokens' character offsets to `context[start:end]`, an exact
substring of the original context (surrounding whitespace trimmed). `probability` is the
softmax of the scores over the n-best (deduplicated by text).

    evaluate_qa(workdir, exp, eval_file="") -> {"exact_match", "f1" (SQuAD v1.1, percent, max
        over the gold answers; bigmodel.evaluation.metrics.squad_em_f1), "questions", ...}
        over the run's eval side (DataConfig.val_files or the train file, with eval_articles,
        or TFDS), or over a whole --eval_file
    predict_qa(workdir, exp, input_file) -> [{"id", "question", "text", "score", "start", "end",
        "logit"}] per question of a SQuAD-format file (answers optional); start/end are
        character offsets into the context (text == context[start:end]); score the probability
"""

from __future__ import annotations

import logging

import jax
import numpy as np

from bigmodel.data import qa as qa_data
from bigmodel.data.sources import DataError
from bigmodel.evaluation import metrics

log = logging.getLogger(__name__)


def _top(values: np.ndarray, allowed: np.ndarray, k: int) -> np.ndarray:
  idx = np.flatnonzero(allowed)
  if len(idx) > k:
    idx = idx[np.argsort(-values[idx], kind="stable")[:k]]
  return idx


def decode(features: qa_data.Features, records: list[dict], start_logits: np.ndarray,
           end_logits: np.ndarray, n_best_size: int = 20, max_answer_len: int = 30) -> list[list[dict]]:
  if n_best_size < 1 or max_answer_len < 1:
    raise DataError(f"decoding needs n_best_size >= 1 and max_answer_len >= 1; got {n_best_size}, "
                    f"{max_answer_len} (QaConfig.n_best_size, MAX_ANSWER_LEN)")
  pooled: list[list[tuple]] = [[] for _ in records]
  for i in range(len(features)):
    off = features.token_offsets[i]
    context_tok = (off[:, 0] >= 0) & (off[:, 1] > off[:, 0])
    starts = _top(start_logits[i], context_tok & features.max_context[i], n_best_size)
    ends = _top(end_logits[i], context_tok, n_best_size)
    if not len(starts) or not len(ends):
      continue
    s, e = np.meshgrid(starts, ends, indexing="ij")
    ok = (e >= s) & (e - s + 1 <= max_answer_len)
    for a, b in zip(s[ok], e[ok]):
      pooled[features.example_index[i]].append(
          (float(start_logits[i, a] + end_logits[i, b]), int(off[a, 0]), int(off[b, 1])))
  out = []
  for rec, cands in zip(records, pooled):
    context = rec["context"]
    best, seen = [], set()
    for score, c0, c1 in sorted(cands, key=lambda c: -c[0]):
      text = context[c0:c1]
      lead = len(text) - len(text.lstrip())
      text = text.strip()
      if not text or text in seen:
        continue
      seen.add(text)
      best.append({"text": text, "start": c0 + lead, "end": c0 + lead + len(text), "logit": score})
      if len(best) == n_best_size:
        break
    if best:
      z = np.array([b["logit"] for b in best])
      p = np.exp(z - z.max())
      p /= p.sum()
      for b, q in zip(best, p):
        b["probability"] = float(q)
    out.append(best)
  return out


def span_logits(comp, params, f: qa_data.Features, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Start and end logits float32 [n, s] of every window (padding positions at -1e9)."""
  from bigmodel.objectives import qa as qa_obj
  fn = jax.jit(lambda p, b: qa_obj.span_logits(comp.model, p, b, deterministic=True))
  n = len(f)
  starts, ends = [], []
  for first in range(0, n, batch_size):
    idx = np.arange(first, first + batch_size) % n     # a fixed shape: wrap the last batch
    batch = {"input_ids": f.input_ids[idx], "segment_ids": f.segment_ids[idx],
             "input_mask": f.input_mask[idx]}
    s, e = jax.device_get(fn(params, batch))
    keep = min(batch_size, n - first)
    starts.append(np.asarray(s)[:keep])
    ends.append(np.asarray(e)[:keep])
  return np.concatenate(starts), np.concatenate(ends)


def _predictions(workdir: str, exp, records: list[dict]):
  from bigmodel.train import loop
  cfg = exp.task_data
  comp, params, tokenizer, step = loop.restore_for_inference(workdir, exp)
  f = qa_data.featurize(tokenizer, [{k: v for k, v in r.items() if k != "answer"} for r in records],
                        cfg.seq_len, cfg.doc_stride, cfg.max_query_len)
  start, end = span_logits(comp, params, f, exp.train.batch_size)
  return decode(f, records, start, end, cfg.n_best_size, cfg.max_answer_len), f, step


def evaluate_qa(workdir: str, exp, eval_file: str = "") -> dict:
  records, source = qa_data.eval_source(exp.task_data, eval_file)
  answered = [r for r in records if r["answers"]]
  if len(answered) < len(records):
    log.warning("%s: %d question(s) without gold answers are not scored", source,
                len(records) - len(answered))
  if not answered:
    raise DataError(f"{source}: no question has a gold answer to score against")
  nbest, f, step = _predictions(workdir, exp, answered)
  preds = {r["id"]: (b[0]["text"] if b else "") for r, b in zip(answered, nbest)}
  gold = {r["id"]: r["answers"] for r in answered}
  scores = metrics.squad_em_f1(preds, gold)
  cfg = exp.task_data
  return {"step": step, "source": source, "questions": len(gold), "windows": len(f),
          "exact_match": scores["exact_match"], "f1": scores["f1"],
          "no_answer_predicted": sum(1 for b in nbest if not b),
          "truncated_questions": f.truncated_questions, "seq_len": cfg.seq_len,
          "doc_stride": cfg.doc_stride, "max_answer_len": cfg.max_answer_len}


def predict_qa(workdir: str, exp, input_file: str) -> list[dict]:
  from bigmodel.data import readers
  path = readers.resolve(input_file, exp.data.data_dir)
  records = qa_data.read_file(path)
  nbest, _, _ = _predictions(workdir, exp, records)
  rows = []
  for r, b in zip(records, nbest):
    top = b[0] if b else {"text": "", "start": -1, "end": -1, "logit": None, "probability": 0.0}
    rows.append({"id": r["id"], "question": r["question"], "text": top["text"],
                 "score": top["probability"], "start": top["start"], "end": top["end"],
                 "logit": top["logit"]})
  return rows
