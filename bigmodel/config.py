"""Gin glue: the frozen config dataclasses and the one place that parses gin.

Every knob of a run lives in one of the dataclasses below; experiment files in
`experiments/` bind them (`TrainConfig.train_steps = %TRAIN_STEPS`). Code takes
the sub-config it needs, never the whole experiment.

Macros that every recipe understands (T5X style), with the defaults that
`load` binds before any file is read:

    DATA_DIR    $BIGMODEL_DATA_DIR, or '' (then recipes fall back to TFDS)
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Sequence

import gin


class ConfigError(ValueError):
  """A bad experiment configuration: the message says what and where."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Shape and options of a Transformer (shared by decoder and encoder)."""
  vocab_size: int = gin.REQUIRED
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  head_dim: int = 0            # 0: d_model // num_heads
  d_ff: int = 0                # 0: 4 * d_model
  max_len: int = 1024          # learned position table size
  dropout: float = 0.0
  positions: str = "learned"   # learned | rope
  norm: str = "layernorm"      # layernorm | rmsnorm
  mlp: str = "gelu"            # gelu (tanh approximation, GPT-2) | gelu_exact (erf, BERT) | swiglu
  pre_norm: bool = True        # GPT-2 pre-LN; BERT uses post-LN
  use_bias: bool = True
  tie_embeddings: bool = True
  norm_eps: float = 1e-5
  scan_layers: bool = True
  remat: str = "none"          # none | full | dots
  dtype: str = "float32"       # compute dtype: float32 | bfloat16
  param_dtype: str = "float32"
  one_hot_embed: bool = False  # embedding lookup as a one-hot matmul
  init_std: float = 0.02
  type_vocab_size: int = 2     # encoder only: segment (token type) vocabulary
  num_classes: int = 0         # classification heads (objective `classification`): classes
  pooling: str = "cls"         # classification: cls (the pooler's tanh(dense([CLS]))) | mean (masked mean)

  def __post_init__(self):
    choices = {"positions": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"),
               "mlp": ("gelu", "gelu_exact", "swiglu"), "remat": ("none", "full", "dots"),
               "dtype": ("float32", "bfloat16"), "param_dtype": ("float32", "bfloat16")}
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise ConfigError(f"ModelConfig.{name}={getattr(self, name)!r}: expected one of {allowed}")
    if self.d_model % self.num_heads and not self.head_dim:
      raise ConfigError(f"ModelConfig.d_model={self.d_model} is not divisible by num_heads="
                        f"{self.num_heads}; set ModelConfig.head_dim explicitly")

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def mlp_dim(self) -> int:
    return self.d_ff or 4 * self.d_model


@gin.configurable
@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where text comes from and how it becomes fixed-length rows."""
  data_dir: str = ""
  files: Sequence[str] = ()         # local text files or globs; relative ones live under data_dir
  val_files: Sequence[str] = ()     # optional: else the last `val_fraction` of the token stream
  tfds_name: str = ""               # TFDS dataset: used when `files` is empty, or as the fallback
  tfds_text_key: str = "text"
  prepared_dir: str = ""            # a `bigmodel data prepare` output (local or gs://...): stream its
                                    # token shards (causal LM) instead of reading `files` in memory
  val_fraction: float = 0.1
  documents: str = "file"           # file | blank_line | line | heading: where documents split
  tokenizer: str = "char"           # char | byte | path/to/sentencepiece.model
  seq_len: int = 64
  window_stride: int = 0            # 0: seq_len (no overlap); 1: every offset
  add_eos: bool = True
  seed: int = 0
  eval_batches: int = 20
  # Masked LM + next-sentence pairs (objective `bert_mlm_nsp`), as google-research/bert's
  # create_pretraining_data.py (its flag names in brackets). See bigmodel/data/bert.py.
  mlm_probability: float = 0.15     # [masked_lm_prob]
  mlm_max_predictions: int = 0      # [max_predictions_per_seq]; 0: 15% of seq_len rounded up to 4 (20 at 128, 80 at 512)
  mlm_whole_word: bool = False      # [do_whole_word_mask]: mask all pieces of a word together
  mlm_masking: str = "static"       # static: masks drawn once per copy | dynamic: redrawn at every visit
  dupe_factor: int = 10             # [dupe_factor]: passes over the documents, each with fresh pairs (and masks)
  short_seq_prob: float = 0.1       # [short_seq_prob]: a document's pairs target a random shorter length
  # Task files (objective `classification`; see bigmodel/data/finetune.py): `files` and
  # `val_files` name the train and eval file (TSV, CSV or JSONL).
  text_columns: Sequence[str] = ()  # one column (a sentence) or two (a sentence pair)
  label_column: str = ""
  column_names: Sequence[str] = ()  # the columns of a headerless file (else its first line is the header)
  labels: Sequence[str] = ()        # the label set in id order (default: inferred from the train file)
  # --- token classification (NER) fields
  # (objective `token_classification`; see bigmodel/data/ner.py). `files`/`val_files` are
  # CoNLL column files; with no files, `tfds_name` (e.g. 'conll2003') is read instead.
  token_column: int = 0             # CoNLL: the word column (0-based; -1 is the last)
  tag_column: int = -1              # CoNLL: the tag column (0-based; -1 is the last)
  ner_tag_scheme: str = "iob2"      # iob2 (BIO): tags as they are | iob1: converted to IOB2 on reading
  ner_eval_seq_len: int = 0         # evaluation/prediction row length (0: seq_len)
  ner_length_buckets: Sequence[int] = ()  # training: batches of similar-length sentences, each cut
                                    # to the smallest of these lengths that holds it (() : seq_len)
  ner_input_format: str = "auto"    # predict --input: auto | conll | text (one sentence a line)
  ner_tfds_tokens_key: str = "tokens"  # TFDS: the words feature
  ner_tfds_tags_key: str = "ner"    # TFDS: the tag feature (a sequence of ClassLabel)
  ner_tfds_eval_split: str = "dev"  # TFDS: the evaluation split (conll2003: dev; others: validation)
  # --- extractive QA fields
  # (objective `qa`; see bigmodel/data/qa.py): `files` / `val_files` are SQuAD v1.1 JSON, or
  # `tfds_name` ('squad', 'xquad/en') with the splits below.
  doc_stride: int = 128             # sliding-window step over contexts longer than seq_len
  max_query_len: int = 64           # questions are truncated to this many tokens
  max_answer_len: int = 30          # decoding: the longest answer span, in tokens
  n_best_size: int = 20             # decoding: start/end candidates per window
  train_articles: str = ""          # article range 'START:END' of the train source ('' all)
  eval_articles: str = ""           # ... of the eval source (the train file if val_files is empty)
  tfds_train_split: str = "train"   # TFDS splits of tfds_name (xquad/en has only 'test')
  tfds_eval_split: str = "validation"
  # --- prompted decoder (SFT, translation) fields
  # (objective `prompted_lm`; see bigmodel/data/prompted.py). SFT: `files`/`val_files` are
  # TSV/CSV/JSONL with prompt and response columns; translation: `files`/`val_files` are the
  # source side and `target_files`/`val_target_files` the line-aligned target side.
  prompt_column: str = ""           # SFT: the prompt column (e.g. 'instruction')
  response_column: str = ""         # SFT: the response column (e.g. 'response')
  prompt_template: str = "{prompt}\n"  # the text before the response; {prompt} is the prompt/source
  target_files: Sequence[str] = ()  # translation: target-language train file, line-aligned with files[0]
  val_target_files: Sequence[str] = ()  # translation: target-language eval file
  prompted_spm_vocab: int = 0       # >0: train a SentencePiece model of this size on the train text
  prompted_spm_type: str = "unigram"  # unigram | bpe
  prompted_pack: bool = True        # pack several examples into a row (segment ids keep them apart)
  prompted_max_new_tokens: int = 0  # generation limit (evaluate/predict); 0: up to seq_len
  prompted_samples: int = 5         # generated examples shown by `bigmodel evaluate`
  prompted_eval_limit: int = 0      # evaluate: generate for at most this many eval rows (0: all)


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimConfig:
  name: str = "adamw"               # adamw | adafactor | lamb
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  decay: str = "cosine"             # cosine | linear | constant
  end_lr_fraction: float = 0.1      # lr at the last step, as a fraction of the peak
  b1: float = 0.9
  b2: float = 0.99
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0            # 0: no clipping


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh sizes; -1 takes the devices left over."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1


@gin.configurable
@dataclasses.dataclass(frozen=True)
class TrainConfig:
  train_steps: int = gin.REQUIRED
  batch_size: int = gin.REQUIRED    # global batch, in sequences
  microbatches: int = 1             # gradient accumulation
  eval_every: int = 0               # 0: only at the end
  checkpoint_every: int = 0         # 0: only at the end
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  log_every: int = 50
  seed: int = 0
  peak_flops: float = 0.0           # peak FLOP/s per device for MFU; 0: measure at start
  sample_len: int = 0               # tokens to sample at the end (0: none)
  sample_prompt: str = ""
  objective: str = "causal_lm"
  stop_after: int = 0               # end this process after this step (a planned preemption);
                                    # the schedule still runs to train_steps on resume
  init_checkpoint: str = ""         # a workdir (or its checkpoints/) whose latest params start a
                                    # fresh run (params only: new optimizer state, step 0, data from 0)
  # Bad steps (train/bad_steps.py): a non-finite loss or gradient, or a loss more than
  # spike_zscore deviations above the mean of the last spike_window good losses, skips the update;
  # max_bad_steps in a row stop the run (spike_zscore 0: only non-finite steps are bad;
  # max_bad_steps 0: no guard at all, which resumes checkpoints written before it existed).
  spike_window: int = 32
  spike_zscore: float = 6.0
  max_bad_steps: int = 5


@dataclasses.dataclass(frozen=True)
class Experiment:
  model: ModelConfig
  data: DataConfig
  optim: OptimConfig
  mesh: MeshConfig
  train: TrainConfig


MACRO_DEFAULTS = {"DATA_DIR": lambda: os.environ.get("BIGMODEL_DATA_DIR", "")}


def _format_gin_error(err: Exception) -> str:
  msg = str(err)
  hint = ("\nCheck the spelling against the configurables in bigmodel/config.py "
          "(ModelConfig, DataConfig, OptimConfig, MeshConfig, TrainConfig) and their fields.")
  return msg + hint


def load(gin_files: Sequence[str] = (), bindings: Sequence[str] = (),
         search_paths: Sequence[str] = ()) -> Experiment:
  """Parses gin files then bindings (later wins) and builds the Experiment.

  Raises ConfigError naming the file and binding at fault.
  """
  gin.clear_config()
  file_dirs = [os.path.dirname(os.path.abspath(f)) for f in gin_files]
  for path in list(search_paths) + file_dirs + ["experiments", "."]:
    if os.path.isdir(path):
      gin.add_config_file_search_path(path)
  for name, default in MACRO_DEFAULTS.items():
    gin.bind_parameter(f"{name}/macro.value", default())
  for path in gin_files:
    if not os.path.exists(path):
      raise ConfigError(f"gin file {path!r} does not exist (cwd: {os.getcwd()})")
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.CRITICAL)   # gin logs every include path it tries as an ERROR
  try:
    gin.parse_config_files_and_bindings(list(gin_files), None, finalize_config=False)
  except (ValueError, KeyError, SyntaxError, IOError) as e:
    raise ConfigError(f"in gin files {list(gin_files)}: {_format_gin_error(e)}") from None
  finally:
    root.setLevel(level)
  for b in bindings:
    try:
      gin.parse_config(b)
    except (ValueError, KeyError, SyntaxError) as e:
      raise ConfigError(f"in command-line binding --gin.{b}: {_format_gin_error(e)}") from None
  try:
    exp = Experiment(model=ModelConfig(), data=DataConfig(), optim=OptimConfig(),
                     mesh=MeshConfig(), train=TrainConfig())
  except (ValueError, TypeError, RuntimeError) as e:
    if isinstance(e, ConfigError):
      raise
    raise ConfigError(f"{e}\nSet the missing values in a gin file or with --gin.NAME=VALUE.") from None
  return exp


def operative_config() -> str:
  return gin.operative_config_str()


def parse_mesh(spec: str) -> MeshConfig:
  """`data=2,fsdp=2,tensor=2` -> MeshConfig."""
  sizes = {}
  for part in filter(None, spec.split(",")):
    if "=" not in part:
      raise ConfigError(f"--mesh {spec!r}: expected NAME=SIZE pairs such as data=2,fsdp=2,tensor=2")
    name, value = part.split("=", 1)
    if name not in ("data", "fsdp", "tensor"):
      raise ConfigError(f"--mesh {spec!r}: unknown axis {name!r}; axes are data, fsdp, tensor")
    sizes[name] = int(value)
  return MeshConfig(**sizes)
