"""Task metrics, computed the way each field computes them. Plain Python/numpy on the host.

  accuracy, macro_f1               classification (macro-F1: the unweighted mean of per-class
                                   F1 over the classes seen in gold or predictions, as
                                   scikit-learn's f1_score(average="macro"))
  entity_f1                        NER: entity-level precision/recall/F1 per type and overall,
                                   with conlleval.pl's chunk semantics (seqeval's default mode)
  squad_em_f1                      SQuAD v1.1 official evaluate-v1.1.py: normalized exact match
                                   and token F1, max over the gold answers, in percent
  bleu                             corpus BLEU via sacrebleu (13a tokenization, as WMT reports)
  perplexity                       exp(summed negative log-likelihood / token count)
"""

from __future__ import annotations

import collections
import math
import re
import string
from typing import Iterable, Sequence


# ----------------------------------------------------------------------------- classification


def accuracy(gold: Sequence, pred: Sequence) -> float:
  _same_length(gold, pred)
  if not gold:
    return 0.0
  return sum(g == p for g, p in zip(gold, pred)) / len(gold)


def per_class_f1(gold: Sequence, pred: Sequence) -> dict:
  """{class: F1} over the classes that occur in gold or predictions."""
  _same_length(gold, pred)
  tp, fp, fn = collections.Counter(), collections.Counter(), collections.Counter()
  for g, p in zip(gold, pred):
    if g == p:
      tp[g] += 1
    else:
      fp[p] += 1
      fn[g] += 1
  classes = sorted(set(gold) | set(pred), key=str)
  return {c: _f1(tp[c], fp[c], fn[c]) for c in classes}


def macro_f1(gold: Sequence, pred: Sequence) -> float:
  scores = per_class_f1(gold, pred)
  return sum(scores.values()) / len(scores) if scores else 0.0


def _f1(tp: int, fp: int, fn: int) -> float:
  denom = 2 * tp + fp + fn
  return 2 * tp / denom if denom else 0.0


def _same_length(a, b):
  if len(a) != len(b):
    raise ValueError(f"gold and predictions differ in length: {len(a)} vs {len(b)}")


# ----------------------------------------------------------------------------- NER (conlleval)


def _split_tag(tag: str) -> tuple[str, str]:
  """'B-PER' -> ('B', 'PER'); 'O' -> ('O', ''); a bare type 'PER' counts as ('I', 'PER')."""
  if tag in ("O", "", "."):
    return "O", ""
  if len(tag) > 1 and tag[1] in "-_" and tag[0] in "BIESU":
    prefix = "S" if tag[0] == "U" else tag[0]
    return prefix, tag[2:]
  return "I", tag


def _end_of_chunk(prev_tag, tag, prev_type, type_) -> bool:
  """conlleval.pl endOfChunk: the chunk open before this token ends before it."""
  if prev_tag in ("E", "S"):
    return True
  if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
    return True
  return prev_tag != "O" and prev_type != type_


def _start_of_chunk(prev_tag, tag, prev_type, type_) -> bool:
  """conlleval.pl startOfChunk: a chunk starts at this token (I- after O or after another
  type starts one, as conlleval does)."""
  if tag in ("B", "S"):
    return True
  if prev_tag in ("E", "S", "O") and tag in ("I", "E"):
    return True
  return tag != "O" and prev_type != type_


def entities(tags: Sequence[str]) -> list[tuple[str, int, int]]:
  """Chunks of one sentence as (type, start, end inclusive), conlleval semantics."""
  out = []
  prev_tag, prev_type, start = "O", "", None
  for i, tag in enumerate(list(tags) + ["O"]):
    t, ty = _split_tag(tag)
    if start is not None and _end_of_chunk(prev_tag, t, prev_type, ty):
      out.append((prev_type, start, i - 1))
      start = None
    if _start_of_chunk(prev_tag, t, prev_type, ty):
      start = i
    prev_tag, prev_type = t, ty
  return out


def entity_f1(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
  """Entity-level scores over sentences of tags: {"precision", "recall", "f1" (overall, in
  [0, 1]), "per_type": {type: {"precision", "recall", "f1", "support"}}}. A predicted entity
  counts only if its type, start and end all match a gold one."""
  _same_length(gold, pred)
  tp, n_gold, n_pred = collections.Counter(), collections.Counter(), collections.Counter()
  for i, (g, p) in enumerate(zip(gold, pred)):
    if len(g) != len(p):
      raise ValueError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted tags")
    ge, pe = set(entities(g)), set(entities(p))
    for ty, _, _ in ge:
      n_gold[ty] += 1
    for ty, _, _ in pe:
      n_pred[ty] += 1
    for ty, _, _ in ge & pe:
      tp[ty] += 1

  def prf(t, ng, np_):
    precision = t / np_ if np_ else 0.0
    recall = t / ng if ng else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1

  per_type = {}
  for ty in sorted(set(n_gold) | set(n_pred)):
    p_, r_, f_ = prf(tp[ty], n_gold[ty], n_pred[ty])
    per_type[ty] = {"precision": p_, "recall": r_, "f1": f_, "support": n_gold[ty]}
  p_, r_, f_ = prf(sum(tp.values()), sum(n_gold.values()), sum(n_pred.values()))
  return {"precision": p_, "recall": r_, "f1": f_, "per_type": per_type}


# ----------------------------------------------------------------------------- SQuAD v1.1


def normalize_answer(s: str) -> str:
  """SQuAD v1.1 evaluate-v1.1.py: lower case, drop punctuation, articles and extra spaces."""
  s = s.lower()
  exclude = set(string.punctuation)
  s = "".join(ch for ch in s if ch not in exclude)
  s = re.sub(r"\b(a|an|the)\b", " ", s)
  return " ".join(s.split())


def squad_exact(prediction: str, truth: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(truth))


def squad_f1(prediction: str, truth: str) -> float:
  p, g = normalize_answer(prediction).split(), normalize_answer(truth).split()
  common = collections.Counter(p) & collections.Counter(g)
  same = sum(common.values())
  if same == 0:
    return 0.0
  precision, recall = same / len(p), same / len(g)
  return 2 * precision * recall / (precision + recall)


def squad_em_f1(predictions: dict, answers: dict) -> dict:
  """predictions {question id: text}, answers {question id: [gold texts]} -> {"exact_match",
  "f1"} in percent over all questions of `answers` (a missing prediction scores 0, as the
  official script)."""
  if not answers:
    raise ValueError("no questions to score")
  em = f1 = 0.0
  for qid, golds in answers.items():
    if not golds:
      raise ValueError(f"question {qid!r} has no gold answer")
    if qid not in predictions:
      continue
    em += max(squad_exact(predictions[qid], g) for g in golds)
    f1 += max(squad_f1(predictions[qid], g) for g in golds)
  return {"exact_match": 100.0 * em / len(answers), "f1": 100.0 * f1 / len(answers)}


# ----------------------------------------------------------------------------- BLEU, perplexity


def bleu(hypotheses: Sequence[str], references: Sequence[str] | Sequence[Sequence[str]]) -> float:
  """Corpus BLEU (0-100) by sacrebleu. references: one string per hypothesis, or several
  reference streams (a list of lists, each as long as hypotheses)."""
  import sacrebleu
  if references and isinstance(references[0], str):
    streams = [list(references)]
  else:
    streams = [list(r) for r in references]
  for r in streams:
    _same_length(hypotheses, r)
  return float(sacrebleu.corpus_bleu(list(hypotheses), streams).score)


def perplexity(nll_sum: float, count: float) -> float:
  """exp(mean negative log-likelihood per token) from a summed NLL (nats) over `count` tokens."""
  if count <= 0:
    raise ValueError("perplexity over zero tokens")
  return math.exp(nll_sum / count)


def perplexity_from_logprobs(logprobs: Iterable[float]) -> float:
  lp = list(logprobs)
  return perplexity(-sum(lp), len(lp))
