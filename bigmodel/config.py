"""Gin glue: the frozen config dataclasses and the one place that parses gin.

Every knob of a run lives in one of the dataclasses below, or in the task's own section,
which lives with its objective in bigmodel/objectives (`Objective.config`: MlmConfig,
ClassificationConfig, NerConfig, QaConfig, PromptedConfig, MathsConfig; `Experiment.task`).
Experiment files in `experiments/` bind them (`TrainConfig.train_steps = %TRAIN_STEPS`).
Code takes the sub-config it needs, never the whole experiment.

Macros that every recipe understands (T5X style): the run macros TRAIN_STEPS, BATCH_SIZE,
SEQ_LEN, EVAL_EVERY, CHECKPOINT_EVERY, and with the default that `load` binds before any
file is read:

    DATA_DIR    $BIGMODEL_DATA_DIR, or '' (then recipes fall back to TFDS)

A binding or macro that building the Experiment never reads is an error (`unused_bindings`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import types
from typing import Any, Collection, Mapping, Sequence

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
  num_kv_heads: int = 0        # key/value heads: 0 or num_heads multi-head, 1 multi-query, else
                               # grouped-query (must divide num_heads)
  head_dim: int = 0            # 0: d_model // num_heads
  d_ff: int = 0                # 0: 4 * d_model
  max_len: int = 1024          # learned position table size
  dropout: float = 0.0
  positions: str = "learned"   # learned | rope
  rope_theta: float = 10000.0  # RoPE base (Llama 3: 500000)
  norm: str = "layernorm"      # layernorm | rmsnorm
  mlp: str = "gelu"            # gelu (tanh approximation, GPT-2) | gelu_exact (erf, BERT) | swiglu
  pre_norm: bool = True        # GPT-2 pre-LN; BERT uses post-LN
  use_bias: bool = True
  qkv_bias: bool = False       # biases on the q/k/v projections only (Qwen2); use_bias implies them
  tie_embeddings: bool = True
  norm_eps: float = 1e-5
  scan_layers: bool = True
  remat: str = "none"          # none | full | dots
  dtype: str = "float32"       # compute dtype: float32 | bfloat16
  param_dtype: str = "float32"
  one_hot_embed: bool = False  # embedding lookup as a one-hot matmul
  init_std: float = 0.02
  type_vocab_size: int = 2     # encoder only: segment (token type) vocabulary
  # LoRA (bigmodel/models/lora.py): rank-r adapters beside the targeted projections, the base
  # params frozen; 0: off (the param tree is the plain model's).
  lora_rank: int = 0
  lora_alpha: float = 16.0     # the adapters' output is scaled by lora_alpha / lora_rank
  lora_targets: Sequence[str] = ("qkv", "q", "kv", "out", "wi", "wi_gate", "wo")  # attention:
                               # qkv (multi-head) or q, kv (grouped); out. MLP: wi, wi_gate
                               # (SwiGLU only; else ignored), wo
  attention: str = "xla"       # xla | dot_product | cudnn | splash (bigmodel/models/attention.py)
  loss_chunk: int = 0          # causal LM: sequence positions per chunk of the loss (0: whole logits)
  decode_span: int = 0         # KV-cache decoding attends to the first decode_span cache slots
                               # only (0: all); the serving engine sets it per call

  def __post_init__(self):
    choices = {"positions": ("learned", "rope"), "norm": ("layernorm", "rmsnorm"),
               "mlp": ("gelu", "gelu_exact", "swiglu"), "remat": ("none", "full", "dots"),
               "dtype": ("float32", "bfloat16"), "param_dtype": ("float32", "bfloat16"),
               "attention": ("xla", "dot_product", "cudnn", "splash")}
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise ConfigError(f"ModelConfig.{name}={getattr(self, name)!r}: expected one of {allowed}")
    object.__setattr__(self, "lora_targets", tuple(self.lora_targets))   # gin gives lists
    if self.lora_rank < 0:
      raise ConfigError(f"ModelConfig.lora_rank={self.lora_rank}: use 0 (no LoRA) or a rank >= 1")
    lora_names = ("qkv", "q", "kv", "out", "wi", "wi_gate", "wo")
    bad = [t for t in self.lora_targets if t not in lora_names]
    if self.lora_rank and (bad or not self.lora_targets):
      raise ConfigError(f"ModelConfig.lora_targets={tuple(self.lora_targets)!r}: name one or more "
                        f"of {lora_names}")
    if self.loss_chunk < 0:
      raise ConfigError(f"ModelConfig.loss_chunk={self.loss_chunk}: expected >= 0 (0: off)")
    if self.decode_span < 0:
      raise ConfigError(f"ModelConfig.decode_span={self.decode_span}: expected >= 0 (0: all slots)")
    if self.d_model % self.num_heads and not self.head_dim:
      raise ConfigError(f"ModelConfig.d_model={self.d_model} is not divisible by num_heads="
                        f"{self.num_heads}; set ModelConfig.head_dim explicitly")
    if self.num_kv_heads < 0 or (self.num_kv_heads and self.num_heads % self.num_kv_heads):
      raise ConfigError(f"ModelConfig.num_kv_heads={self.num_kv_heads} must divide num_heads="
                        f"{self.num_heads} (0 or {self.num_heads}: multi-head; 1: multi-query)")
    if self.rope_theta <= 0:
      raise ConfigError(f"ModelConfig.rope_theta={self.rope_theta}: the RoPE base must be positive")

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def kv_heads(self) -> int:
    """Key/value heads: num_heads (multi-head) unless num_kv_heads says fewer."""
    return self.num_kv_heads or self.num_heads

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
  scrub_pii: bool = False           # replace e-mails, phones, cards, IBANs, IPs, URL credentials
                                    # by <EMAIL> ... placeholders in all text read (data/pii.py)
  documents: str = "file"           # file | blank_line | line | heading: where documents split
  tokenizer: str = "char"           # char | byte | path/to/sentencepiece.model
  seq_len: int = 64
  window_stride: int = 0            # LM rows, recommender windows: 0 = seq_len (no overlap)
  add_eos: bool = True
  seed: int = 0
  eval_batches: int = 20
  # Task settings (text columns, labels, masking, QA windows, prompts...) live in each
  # objective's own section (Objective.config in bigmodel/objectives): MlmConfig,
  # ClassificationConfig, NerConfig, QaConfig, PromptedConfig, MathsConfig.

  def __post_init__(self):
    if self.window_stride < 0:
      raise ConfigError(f"DataConfig.window_stride={self.window_stride}: expected 0 (seq_len, no "
                        f"overlap) or a positive number of tokens (items) between rows' starts")


@gin.configurable
@dataclasses.dataclass(frozen=True)
class OptimConfig:
  name: str = "adamw"               # adamw | adafactor | lamb | sgd (plain gradient descent)
  learning_rate: float = 1e-3
  warmup_steps: int = 100
  decay: str = "cosine"             # cosine | linear | constant
  end_lr_fraction: float = 0.1      # lr at the last step, as a fraction of the peak
  b1: float = 0.9
  b2: float = 0.99
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0            # 0: no clipping
  # DP-SGD (bigmodel/train/dp.py): per-example gradients clipped to dp_l2_clip (> 0 turns it
  # on), Gaussian noise of std dp_noise_multiplier * dp_l2_clip on their sum. dp_epsilon > 0
  # computes the multiplier before training (for train_steps at dp_delta; 0: 1/n).
  dp_l2_clip: float = 0.0
  dp_noise_multiplier: float = 0.0
  dp_epsilon: float = 0.0
  dp_delta: float = 0.0
  dp_sampling: str = "poisson"      # poisson (exact account) | shuffle (accounted as if Poisson)
  dp_accountant: str = "pld"        # pld | rdp (rdp: shuffle sampling only)
  # Frozen params (bigmodel/train/frozen.py): regular expressions matched in full against
  # '/'-joined param paths (e.g. 'embed/embedding'); those leaves get no gradient, no DP noise,
  # no optimizer state and no update.
  frozen_params: Sequence[str] = ()


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


class TaskData:
  """A task pipeline's settings: DataConfig's shared fields and the fields of its objective's
  own section (`Experiment.task`: MlmConfig, ClassificationConfig, ...), read as attributes of
  one object (`cfg.seq_len`, `cfg.text_columns`). The two never share a field name."""

  def __init__(self, data: DataConfig, task=None):
    object.__setattr__(self, "data", data)
    object.__setattr__(self, "task", task)

  def __getattr__(self, name):
    task, data = self.__dict__.get("task"), self.__dict__.get("data")
    for part in (task, data):
      if part is not None and name in {f.name for f in dataclasses.fields(part)}:
        return getattr(part, name)
    raise AttributeError(f"neither DataConfig nor this task's section ({type(task).__name__}) "
                         f"has a field {name!r}")

  def __setattr__(self, name, value):
    raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

  def __repr__(self):
    return f"TaskData({self.data!r}, {self.task!r})"


def task_config(section, **fields) -> TaskData:
  """A TaskData from keyword fields, each given to DataConfig or to the task section class
  `section` (ClassificationConfig, ...) by name: for code and tests that build a pipeline's
  config by hand."""
  own = {f.name for f in dataclasses.fields(section)}
  unknown = set(fields) - own - {f.name for f in dataclasses.fields(DataConfig)}
  if unknown:
    raise ConfigError(f"neither DataConfig nor {section.__name__} has the field(s) {sorted(unknown)}")
  return TaskData(DataConfig(**{k: v for k, v in fields.items() if k not in own}),
                  section(**{k: v for k, v in fields.items() if k in own}))


@dataclasses.dataclass(frozen=True)
class Experiment:
  model: ModelConfig
  data: DataConfig
  optim: OptimConfig
  mesh: MeshConfig
  train: TrainConfig
  task: Any = None      # the objective's own config section (`Objective.config`), or None
  prune: Any = None     # prune.PruneConfig when a binding names it (bigmodel/prune.py), or None

  @property
  def task_data(self):
    """What the objective's input pipeline reads: DataConfig alone, or with the task section."""
    return self.data if self.task is None else TaskData(self.data, self.task)


MACRO_DEFAULTS = {"DATA_DIR": lambda: os.environ.get("BIGMODEL_DATA_DIR", "")}
# The run macros that every recipe in experiments/ takes (and binds into TrainConfig/DataConfig).
RUN_MACROS = ("TRAIN_STEPS", "BATCH_SIZE", "SEQ_LEN", "EVAL_EVERY", "CHECKPOINT_EVERY")


def _format_gin_error(err: Exception) -> str:
  msg = str(err)
  hint = ("\nCheck the spelling against the configurables in bigmodel/config.py "
          "(ModelConfig, DataConfig, OptimConfig, MeshConfig, TrainConfig) and the task sections "
          "of bigmodel/objectives (MlmConfig, ClassificationConfig, NerConfig, QaConfig, "
          "PromptedConfig), and their fields.")
  return msg + hint


# A recipe that takes its model from the run it starts from (the *_fast test recipes: the start's
# config.gin comes first) may bind `DEFAULTS = ["include 'sizes/minilm_l6.gin'", ...]`: gin
# statements parsed before every file, so that the recipe alone still loads (`bigmodel compile`)
# while any file or binding given sets the model all the same.
RECIPE_DEFAULTS = "DEFAULTS"


def load(gin_files: Sequence[str] = (), bindings: Sequence[str] = (),
         search_paths: Sequence[str] = (), defaults: Mapping[str, Any] | None = None) -> Experiment:
  """Parses gin files then bindings (later wins) and builds the Experiment.

  `defaults`: macros bound before the files (any file or binding overrides them), e.g. the
  placeholders that `bigmodel compile` gives the inputs only training reads.
  Raises ConfigError naming the file and binding at fault.
  """
  defaults = defaults or {}
  read_by_files = _parse(gin_files, bindings, search_paths, defaults, ())
  before = _recipe_defaults()
  if before:
    read_by_files = _parse(gin_files, bindings, search_paths, defaults, before)
  return _build(gin_files, read_by_files, weak=set(defaults))


def gin_bindings(operative: bool = False) -> Mapping[tuple[str, str], Mapping[str, Any]]:
  """gin's table of the parsed bindings, read-only: {(scope, selector): {param: value}}, the
  macro NAME as {(NAME, "gin.macro"): {"value": v}}, values as parsed (`%NAME` and
  `@configurable` are gin reference objects). operative=True: the table of the values that
  configurable calls used so far (what `operative_config` prints), same layout.

  gin (0.5) has no public reader for either (`config_str`/`operative_config_str` print them):
  this is the one place that reads its private `_CONFIG` and `_OPERATIVE_CONFIG`; the
  recipe's DEFAULTS, the macro references, the unused-binding check and Experiment.prune read
  them through it. A gin upgrade that renames them breaks only this function."""
  from gin import config as gin_config
  table = gin_config._OPERATIVE_CONFIG if operative else gin_config._CONFIG   # pylint: disable=protected-access
  return types.MappingProxyType(table)


def _recipe_defaults() -> list[str]:
  value = gin_bindings().get((RECIPE_DEFAULTS, "gin.macro"), {}).get("value")
  if value is None:
    return []
  if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
    raise ConfigError(f"{RECIPE_DEFAULTS} = {value!r}: expected a list of gin statements, e.g. "
                      f"[\"include 'sizes/minilm_l6.gin'\"]")
  return list(value)


def _parse(gin_files, bindings, search_paths, defaults: Mapping[str, Any], before: Sequence[str]) -> set[str]:
  """Parses `defaults`, `before`, the files, then the bindings; the macros the files name."""
  from bigmodel import objectives, prune  # noqa: F401  (register the task sections and PruneConfig with gin)
  gin.clear_config()
  file_dirs = [os.path.dirname(os.path.abspath(f)) for f in gin_files]
  for path in list(search_paths) + file_dirs + ["experiments", "."]:
    if os.path.isdir(path):
      gin.add_config_file_search_path(os.path.abspath(path))
  for name, default in MACRO_DEFAULTS.items():
    gin.bind_parameter(f"{name}/macro.value", default())
  for name, value in defaults.items():
    gin.bind_parameter(f"{name}/macro.value", value)
  for path in gin_files:
    if not os.path.exists(path):
      raise ConfigError(f"gin file {path!r} does not exist (cwd: {os.getcwd()})")
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.CRITICAL)   # gin logs every include path it tries as an ERROR
  try:
    for statement in before:
      gin.parse_config(statement)
    for path in gin_files:
      text = open(path).read()
      new = migrate_legacy(text)
      if new == text:
        gin.parse_config_file(path)
      else:     # a config.gin written before the task sections
        logging.getLogger(__name__).warning("%s binds task fields in their former place; read "
                                            "as their task section's fields", path)
        gin.parse_config(new)
  except (ValueError, KeyError, SyntaxError, IOError) as e:
    raise ConfigError(f"in gin files {list(gin_files)}: {_format_gin_error(e)}") from None
  finally:
    root.setLevel(level)
  read_by_files = _macro_references()
  for b in bindings:
    try:
      gin.parse_config(b)
    except (ValueError, KeyError, SyntaxError) as e:
      raise ConfigError(f"in command-line binding --gin.{b}: {_format_gin_error(e)}") from None
  return read_by_files


def _build(gin_files, read_by_files: set[str], weak: Collection[str]) -> Experiment:
  from bigmodel import prune
  try:
    train = TrainConfig()
    section = _task_section(train.objective)
    exp = Experiment(model=ModelConfig(), data=DataConfig(), optim=OptimConfig(),
                     mesh=MeshConfig(), train=train, task=section() if section else None)
    for extra in _extra_sections(train.objective):
      extra()
    if _binds_configurable("PruneConfig"):   # else None: a run without it keeps its config.gin
      exp = dataclasses.replace(exp, prune=prune.PruneConfig())
  except (ValueError, TypeError, RuntimeError) as e:
    if isinstance(e, ConfigError):
      raise
    macro = re.search(r"configurable 'macro' .* in scope '(\w+)'", str(e))
    if macro:
      raise ConfigError(f"the macro {macro.group(1)} has no value: set it in the recipe or with "
                        f"--gin.{macro.group(1)}=VALUE") from None
    raise ConfigError(f"{e}\nSet the missing values in a gin file or with --gin.NAME=VALUE.") from None
  # A command-line binding may replace a recipe binding that read a macro
  # (--gin.TrainConfig.train_steps=5 over `= %TRAIN_STEPS`): the user chose that binding.
  unused = [n for n in unused_bindings(weak) if n not in read_by_files - _macro_references()]
  if unused:
    reads = f"; its objective {train.objective!r} reads " + (section.__name__ if section else
                                                           "no task section")
    raise ConfigError(
        f"set but never read: {', '.join(unused)} (in {list(gin_files) or 'no gin file'} or "
        f"the --gin. bindings). A macro counts when a binding that the run uses names it "
        f"(TrainConfig.train_steps = %TRAIN_STEPS); a binding counts when its section is one "
        f"the run builds (ModelConfig, DataConfig, OptimConfig, MeshConfig, TrainConfig{reads}). "
        f"Fix the spelling or drop it.")
  return exp


def _binds_configurable(name: str) -> bool:
  """Whether a parsed binding names the configurable `name` (in any scope)."""
  return any(sel.rsplit(".", 1)[-1] == name for _, sel in gin_bindings())


def _task_section(objective: str):
  """The objective's config section class (None: it has none); ConfigError if unknown."""
  from bigmodel import objectives
  try:
    return objectives.get(objective).config
  except ValueError as e:
    raise ConfigError(f"TrainConfig.objective: {e}") from None


def migrate_legacy(text: str) -> str:
  """A gin text from before the task sections (an older run's config.gin), its task fields moved:
  `DataConfig.X` and `ModelConfig.num_classes/pooling` become `Section.X`, the section of the run's
  objective (`TrainConfig.objective` in the text; else the one section with that field). Other
  text is unchanged."""
  import re
  from bigmodel import objectives
  found = re.search(r"^TrainConfig\.objective\s*=\s*['\"](\w+)['\"]", text, re.M)
  own = objectives.OBJECTIVES.get(found.group(1)) if found else None
  sections = {o.config for o in objectives.OBJECTIVES.values() if o.config is not None}
  data_fields = {f.name for f in dataclasses.fields(DataConfig)}
  model_fields = {f.name for f in dataclasses.fields(ModelConfig)}

  def home(name):
    if own is not None and own.config is not None and name in {
        f.name for f in dataclasses.fields(own.config)}:
      return own.config.__name__
    homes = [c.__name__ for c in sections if name in {f.name for f in dataclasses.fields(c)}]
    return homes[0] if len(homes) == 1 else None

  def move(m):
    configurable, name = m.group(1), m.group(2)
    if name in (data_fields if configurable == "DataConfig" else model_fields):
      return m.group(0)
    section = home(name)
    return f"{section}.{name}" if section else m.group(0)
  return re.sub(r"^(DataConfig|ModelConfig)\.(\w+)(?=\s*=)", move, text, flags=re.M)


def _extra_sections(objective: str) -> tuple:
  from bigmodel import objectives
  return objectives.get(objective).extra_configs


def _macro_references() -> set[str]:
  """The macros that the parsed bindings name (`%NAME`)."""
  return {ref.config_key[0] for ref in gin.config.iterate_references(gin_bindings())
          if ref.config_key[1] == "gin.macro"}


def unused_bindings(weak: Collection[str] = ()) -> list[str]:
  """The bindings and macros of the parsed config that building the Experiment never read
  (gin's own tables: every binding against the operative config, which records the ones a
  configurable call used). Macros that `load` binds by default are exempt: DATA_DIR, a
  recipe's DEFAULTS, and `weak` (the names of load's `defaults`)."""
  used = gin_bindings(operative=True)
  names = []
  for (scope, selector), params in gin_bindings().items():
    if selector == "gin.macro":
      exempt = scope in MACRO_DEFAULTS or scope == RECIPE_DEFAULTS or scope in weak
      if not exempt and (scope, selector) not in used:
        names.append(scope)
      continue
    prefix = f"{scope}/" if scope else ""
    for arg in params:
      if arg not in used.get((scope, selector), {}):
        names.append(f"{prefix}{selector.rsplit('.', 1)[-1]}.{arg}")
  return sorted(names)


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
