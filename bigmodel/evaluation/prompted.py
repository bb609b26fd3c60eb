"""`bigmodel evaluate` / `bigmodel predict` for prompted decoders (objective `prompted_lm`).

    evaluate(workdir, exp, eval_file="") -> metrics dict
      both      loss, perplexity (per held-out response token, EOS included: teacher-forced
                over the response tokens only, prompts conditioning), accuracy, examples
      SFT       samples: greedy answers to PromptedConfig.prompted_samples held-out prompts, spread
                evenly over the eval rows
      translation  bleu (sacrebleu corpus BLEU, 13a, of batched greedy decodes of the eval
                sources against their references; PromptedConfig.prompted_eval_limit caps the rows)
                and samples (source, reference, hypothesis)
    predict(workdir, exp, input_file) -> [{"prompt", "response"}] (SFT: the prompt column of a
      TSV/CSV/JSONL file) or [{"source", "translation"}] (translation: a text file, one a line)

The eval file is `eval_file` (translation: `SRC` with the target beside it by extension, or
`SRC,TGT`), else the run's eval file, else the run's seeded held-out rows.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from bigmodel import sharding
from bigmodel.data import prompted as pd
from bigmodel.evaluation import metrics
from bigmodel.infer import greedy
from bigmodel.train import loop

log = logging.getLogger(__name__)


def prompt_ids(tokenizer, cfg, prompts: list[str], max_new: int) -> list[np.ndarray]:
  """Templated prompts as ids, each cut at the left so that max_new tokens (at least half
  the window) still fit after it."""
  out = []
  for i, p in enumerate(prompts):
    ids = pd.encode_text(tokenizer, pd.apply_template(cfg.prompt_template, p), f"input {i + 1}")
    if len(ids) == 0:
      raise pd.DataError(f"input {i + 1}: the prompt is empty after the template")
    out.append(pd.fit(ids, np.zeros(max_new, np.int32), cfg.seq_len)[0])
  return out


def generate(comp, params, tokenizer, cfg, prompts: list[str], batch_size: int) -> list[str]:
  """Greedy responses (decoded text) to raw prompts, batched."""
  max_new = cfg.prompted_max_new_tokens or cfg.seq_len
  ids = prompt_ids(tokenizer, cfg, prompts, max_new)
  gen = greedy.greedy_decode(comp.model, params, ids, cfg.seq_len, pd.check_tokenizer(tokenizer),
                             max_new, batch_size, multiple=sharding.batch_size_per(comp.mesh),
                             pad_id=0)
  return [tokenizer.decode(g).strip() for g in gen]


def spread(n: int, k: int) -> list[int]:
  """k row indices spread evenly over n rows (the first k when k >= n)."""
  if k >= n:
    return list(range(n))
  return [int(i) for i in np.linspace(0, n - 1, max(k, 0))]


def _loss(comp, params, tokenizer, cfg, pairs: pd.Pairs) -> dict:
  examples, counts = pd.encode_pairs(tokenizer, cfg.prompt_template, pairs, cfg.seq_len)
  rows = pd.pack(examples, cfg.seq_len, cfg.prompted_pack, None, counts)
  data = pd.PromptedData(cfg, tokenizer, rows, rows, pairs.source)
  res = loop.evaluate(comp, params, data)
  return {"loss": res["loss"], "perplexity": res["perplexity"], "accuracy": res["accuracy"],
          "response_tokens": rows.counts["response_tokens"],
          "truncated": counts["truncated"], "truncated_prompts": counts["truncated_prompts"],
          "truncated_responses": counts["truncated_responses"]}


def evaluate_prompted(workdir: str, exp, eval_file: str = "") -> dict:
  cfg = exp.task_data
  pairs = pd.read_eval_pairs(cfg, eval_file)
  comp, params, tokenizer, step = loop.restore_for_inference(workdir, exp)
  translation = pd.is_translation(cfg)
  out = {"step": step, "task": "translation" if translation else "sft", "file": pairs.source,
         "examples": len(pairs)}
  out.update(_loss(comp, params, tokenizer, cfg, pairs))
  bs = max(exp.train.batch_size, 32)
  if translation:
    n = min(len(pairs), cfg.prompted_eval_limit) if cfg.prompted_eval_limit else len(pairs)
    t0 = time.time()
    hyps = generate(comp, params, tokenizer, cfg, pairs.prompts[:n], bs)
    out["bleu"] = metrics.bleu(hyps, pairs.responses[:n])
    out["bleu_examples"] = n
    out["decode_seconds"] = round(time.time() - t0, 1)
    out["samples"] = [{"source": pairs.prompts[i], "reference": pairs.responses[i],
                       "hypothesis": hyps[i]} for i in spread(n, cfg.prompted_samples)]
  else:
    idx = spread(len(pairs), cfg.prompted_samples)
    answers = generate(comp, params, tokenizer, cfg, [pairs.prompts[i] for i in idx], bs)
    out["samples"] = [{"prompt": pairs.prompts[i], "reference": pairs.responses[i],
                       "generated": a} for i, a in zip(idx, answers)]
  return out


def predict_prompted(workdir: str, exp, input_file: str) -> list[dict]:
  cfg = exp.task_data
  prompts = pd.read_inputs(cfg, input_file)
  comp, params, tokenizer, _ = loop.restore_for_inference(workdir, exp)
  outs = generate(comp, params, tokenizer, cfg, prompts, max(exp.train.batch_size, 32))
  if pd.is_translation(cfg):
    return [{"source": p, "translation": o} for p, o in zip(prompts, outs)]
  return [{"prompt": p, "response": o} for p, o in zip(prompts, outs)]
