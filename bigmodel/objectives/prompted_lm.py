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

import dataclasses
from typing import Sequence

import gin

from bigmodel.objectives import lm

model_args = lm.model_args
example_batch = lm.example_batch
summarize = lm.summarize


@gin.configurable
@dataclasses.dataclass(frozen=True)
class PromptedConfig:
  """Prompted decoder (SFT, translation; objective `prompted_lm`; see bigmodel/data/prompted.py).
  SFT: DataConfig.files / val_files are TSV/CSV/JSONL with prompt and response columns;
  translation: DataConfig.files / val_files are the source side and `target_files` /
  `val_target_files` the line-aligned target side."""
  prompt_column: str = ""           # SFT: the prompt column (e.g. 'instruction')
  response_column: str = ""         # SFT: the response column (e.g. 'response')
  column_names: Sequence[str] = ()  # the columns of a headerless file (else its first line is the header)
  prompt_template: str = "{prompt}\n"  # the text before the response; {prompt} is the prompt/source
  target_files: Sequence[str] = ()  # translation: target-language train file, line-aligned with files[0]
  val_target_files: Sequence[str] = ()  # translation: target-language eval file
  prompted_spm_vocab: int = 0       # >0: train a SentencePiece model of this size on the train text
  prompted_spm_type: str = "unigram"  # unigram | bpe
  prompted_pack: bool = True        # pack several examples into a row (segment ids keep them apart)
  prompted_max_new_tokens: int = 0  # generation limit (evaluate/predict); 0: up to seq_len
  prompted_samples: int = 5         # generated examples shown by `bigmodel evaluate`
  prompted_eval_limit: int = 0      # evaluate: generate for at most this many eval rows (0: all)


def build_data(cfg, tokenizer=None):
  from bigmodel.data import prompted as prompted_data   # the pipeline only when used
  return prompted_data.PromptedData.build(cfg, tokenizer)


def prompted_lm_loss(model, params, batch, *, deterministic=True, rngs=None):
  from bigmodel.data import prompted as prompted_data
  missing = [k for k in prompted_data.KEYS if k not in batch]
  if missing:
    raise ValueError(f"a prompted_lm batch needs {list(prompted_data.KEYS)}; missing {missing}")
  return lm.causal_lm_loss(model, params, batch, deterministic=deterministic, rngs=rngs)
