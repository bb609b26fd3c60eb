"""Prompted decoder fine-tuning (objective `prompted_lm`, model `decoder`): SFT on (prompt,
response) pairs and translation as a prompted decoder (source, separator, target).

The loss is the causal-LM cross entropy of `objectives/lm.py` over rows built by
`bigmodel/data/prompted.py`, whose weights are 1 only on response targets and the EOS after
them: prompt tokens condition the response but carry no loss. Same params as pretraining
(`decoder`), so `TrainConfig.init_checkpoint` can name any `bigmodel train` GPT workdir.

batch: inputs, targets, positions, segment_ids int32 [b, s]; weights float32 [b, s].
Sums: loss (summed over response tokens), weight (response tokens), correct. Metrics
(summarize): loss and perplexity per response token, next-token accuracy.
"""

from __future__ import annotations

from bigmodel.data import prompted as prompted_data
from bigmodel.objectives import lm

model_args = lm.model_args
example_batch = lm.example_batch
summarize = lm.summarize


def build_data(cfg, tokenizer=None) -> prompted_data.PromptedData:
  return prompted_data.PromptedData.build(cfg, tokenizer)


def prompted_lm_loss(model, params, batch, *, deterministic=True, rngs=None):
  missing = [k for k in prompted_data.KEYS if k not in batch]
  if missing:
    raise ValueError(f"a prompted_lm batch needs {list(prompted_data.KEYS)}; missing {missing}")
  return lm.causal_lm_loss(model, params, batch, deterministic=deterministic, rngs=rngs)
