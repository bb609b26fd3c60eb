"""Prompted-decoder input (objective `prompted_lm`): (prompt, response) pairs -> causal-LM rows
with the loss on the response only. One mechanism serves instruction / dialogue tuning (SFT)
and translation (source, separator, target).

An example is `template(prompt) response EOS`, tokenized as two pieces (so the boundary is
exact): prompt ids P = encode(PromptedConfig.prompt_template with {prompt} replaced), response ids
R = encode(response) + [EOS]. Its causal-LM row is inputs (P+R)[:-1], targets (P+R)[1:], and
weight 1 exactly on the targets that are response tokens or the EOS after them (the prompt's
tokens carry weight 0, so their labels change nothing in the loss).

Sources (DataConfig):
  SFT          files[0] / val_files[0]: TSV, CSV or JSONL with prompt_column and response_column
               (column_names for headerless files)
  translation  files[0] + target_files[0] (train), val_files[0] + val_target_files[0] (eval):
               line-aligned plain-text files, source and target language
  no eval file the seeded `val_fraction` of the train rows is held out (never trained on)
Tokenizer: a given one (init_checkpoint's, or a resumed run's), else a SentencePiece model of
`prompted_spm_vocab` pieces trained here on the training text (prompts and responses; newlines
kept as a piece), else `DataConfig.tokenizer` (byte, a .model path; char has no EOS: refused).
An example longer than seq_len + 1 tokens is truncated: the prompt keeps its end (at most half
the row when the response needs the room), the response its start; the counts are logged and
an example never loses its whole response.

Rows: with `prompted_pack` several examples share a row (best fit; segment ids 1, 2, ...
keep attention inside each, positions restart), else one example a row; padding is segment 0,
weight 0. Packing is fixed once (seeded order); train rows are reshuffled every epoch as a
pure function of (seed, step), so resuming is exact. Eval batches cover every eval row in
order, a partial last batch padded with weight-0 rows.

Batch (numpy, this host's rows): inputs, targets, positions, segment_ids int32 [b, s];
weights float32 [b, s] -- the keys of `objectives/lm.py`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile

import numpy as np

from bigmodel.config import DataConfig
from bigmodel.data import readers, tokenizers
from bigmodel.data.lm import KeyedTable
from bigmodel.data.sources import DataError

log = logging.getLogger(__name__)

KEYS = ("inputs", "targets", "positions", "segment_ids", "weights")


# ----------------------------------------------------------------------------- reading


@dataclasses.dataclass
class Pairs:
  prompts: list[str]
  responses: list[str]
  source: str

  def __len__(self):
    return len(self.prompts)

  def subset(self, idx, what: str) -> "Pairs":
    return Pairs([self.prompts[i] for i in idx], [self.responses[i] for i in idx], what)


def first(files) -> str:
  """The first non-empty name of a file list ('' when none: a recipe's EVAL_FILE = '')."""
  return next((f for f in files if f), "")


def is_translation(cfg: DataConfig) -> bool:
  return bool(first(cfg.target_files))


def apply_template(template: str, prompt: str) -> str:
  if "{prompt}" not in template:
    raise DataError(f"PromptedConfig.prompt_template {template!r} has no {{prompt}} placeholder; "
                    f"e.g. '### Question:\\n{{prompt}}\\n### Answer:\\n' (PROMPT_TEMPLATE)")
  return template.replace("{prompt}", prompt)


def read_sft(path: str, prompt_column: str, response_column: str = "",
             column_names=()) -> tuple[list[str], list[str] | None]:
  """(prompts, responses) of a TSV/CSV/JSONL file; responses None when response_column is ''."""
  if not prompt_column:
    raise DataError("SFT needs PromptedConfig.prompt_column (PROMPT_COLUMN): the prompt column")
  rows = readers.read_table(path, column_names)
  have = list(dict.fromkeys(k for r in rows[:1000] for k in r))
  wanted = [prompt_column] + ([response_column] if response_column else [])
  missing = [c for c in wanted if c not in have]
  if missing:
    raise DataError(f"{path}: no column {', '.join(map(repr, missing))} (columns: {have}); set "
                    f"PROMPT_COLUMN / RESPONSE_COLUMN (or COLUMN_NAMES for a headerless file)")
  prompts, responses = [], [] if response_column else None
  for i, r in enumerate(rows):
    for c in wanted:
      if r.get(c) is None:
        raise DataError(f"{path}: row {i + 1} has no value for column {c!r}")
    prompts.append(str(r[prompt_column]))
    if response_column:
      responses.append(str(r[response_column]))
  return prompts, responses


def read_lines(path: str) -> list[str]:
  """A source-language text file, one input a line (blank lines are an error)."""
  text = readers._read_text(path)
  lines = text.splitlines()
  for n, line in enumerate(lines, 1):
    if not line.strip():
      raise DataError(f"{path}, line {n}: an empty line (one source sentence a line)")
  return lines


def target_path_for(source_path: str, cfg: DataConfig) -> str:
  """An eval source file's target side: `a.SRC,b.TGT` names both; else the same stem with the
  run's target extension (multi30k/test_2016_flickr.en -> .de)."""
  like = first(cfg.val_target_files) or first(cfg.target_files)
  ext = os.path.splitext(like)[1]
  stem = os.path.splitext(source_path)[0]
  if not ext:
    raise DataError(f"cannot tell the target file of {source_path}: pass --eval_file SOURCE,TARGET")
  return stem + ext


def read_eval_pairs(cfg: DataConfig, eval_file: str = "") -> Pairs:
  """The eval pairs: `eval_file` (translation: SOURCE[,TARGET]), else the run's eval file,
  else its seeded held-out share of the train file."""
  if eval_file:
    if is_translation(cfg):
      src, _, tgt = eval_file.partition(",")
      src = readers.resolve(src, cfg.data_dir)
      tgt = readers.resolve(tgt, cfg.data_dir) if tgt else target_path_for(src, cfg)
      return _parallel(src, tgt)
    path = readers.resolve(eval_file, cfg.data_dir)
    p, r = read_sft(path, cfg.prompt_column, cfg.response_column or _need_response(), cfg.column_names)
    return Pairs(p, r, path)
  return load_pairs(cfg)[1]


def _need_response():
  raise DataError("SFT needs PromptedConfig.response_column (RESPONSE_COLUMN): the response column")


def _parallel(src: str, tgt: str) -> Pairs:
  pairs = readers.read_parallel(src, tgt)
  return Pairs([s for s, _ in pairs], [t for _, t in pairs], f"{src} -> {tgt}")


def holdout(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(train rows, held-out rows), both sorted: a seeded `fraction` of n rows is held out."""
  k = int(round(n * fraction))
  if not 0 < k < n:
    raise DataError(f"holding out val_fraction={fraction} of {n} rows leaves {k} eval rows and "
                    f"{n - k} train rows; set DataConfig.val_fraction or an eval file (EVAL_FILE)")
  perm = np.random.default_rng([seed, 0x686f6c64]).permutation(n)
  return np.sort(perm[k:]), np.sort(perm[:k])


def load_pairs(cfg: DataConfig) -> tuple[Pairs, Pairs]:
  """(train pairs, eval pairs) named by the config; PII scrubbed when DataConfig.scrub_pii."""
  train, val = _load_pairs(cfg)
  if not cfg.scrub_pii:
    return train, val
  from bigmodel.data import pii
  out = tuple(dataclasses.replace(p, prompts=pii.scrub_all(p.prompts), responses=None
                                  if p.responses is None else pii.scrub_all(p.responses))
              for p in (train, val))
  pii.report("prompted pairs")
  return out


def _load_pairs(cfg: DataConfig) -> tuple[Pairs, Pairs]:
  if not first(cfg.files):
    raise DataError("prompted fine-tuning needs a train file: DataConfig.files = [%TRAIN_FILE] "
                    "(translation: the source side, with PromptedConfig.target_files)")
  train_path = readers.resolve(first(cfg.files), cfg.data_dir)
  val_path = readers.resolve(first(cfg.val_files), cfg.data_dir)
  if is_translation(cfg):
    train = _parallel(train_path, readers.resolve(first(cfg.target_files), cfg.data_dir))
    if val_path:
      if not first(cfg.val_target_files):
        raise DataError("translation: DataConfig.val_files names the eval source file; set "
                        "PromptedConfig.val_target_files (EVAL_TARGET_FILE) to its target side")
      return train, _parallel(val_path, readers.resolve(first(cfg.val_target_files), cfg.data_dir))
  else:
    if not cfg.response_column:
      _need_response()
    p, r = read_sft(train_path, cfg.prompt_column, cfg.response_column, cfg.column_names)
    train = Pairs(p, r, train_path)
    if val_path:
      p, r = read_sft(val_path, cfg.prompt_column, cfg.response_column, cfg.column_names)
      return train, Pairs(p, r, val_path)
  tr, ev = holdout(len(train), cfg.val_fraction, cfg.seed)
  return (train.subset(tr, f"{train.source} ({len(tr)} rows kept)"),
          train.subset(ev, f"{train.source} ({len(ev)} rows held out, val_fraction="
                           f"{cfg.val_fraction}, seed {cfg.seed})"))


def read_inputs(cfg: DataConfig, path: str) -> list[str]:
  """Prediction inputs: translation, a source text file (one a line); SFT, the prompt column."""
  path = readers.resolve(path, cfg.data_dir)
  if is_translation(cfg):
    return read_lines(path)
  return read_sft(path, cfg.prompt_column, "", cfg.column_names)[0]


# ----------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, model_type: str = "unigram"):
  """A SentencePiece model trained on `texts` (identity normalization, newline kept as a piece,
  so decoding gives the text back); ids 0 <pad>, 1 <unk>, 2 <s>, 3 </s> = EOS."""
  import sentencepiece as spm
  if model_type not in ("unigram", "bpe"):
    raise DataError(f"PromptedConfig.prompted_spm_type={model_type!r}: expected unigram or bpe")
  prefix = os.path.join(tempfile.mkdtemp(prefix="bigmodel_spm_"), "tokenizer")
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([t for t in texts if t]), model_prefix=prefix, vocab_size=vocab_size,
      model_type=model_type, character_coverage=1.0, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
      user_defined_symbols=["\n"], normalization_rule_name="identity",
      remove_extra_whitespaces=False, max_sentence_length=1 << 16, hard_vocab_limit=False,
      minloglevel=2, num_threads=1)
  return tokenizers.SentencePieceTokenizer(prefix + ".model")


def make_tokenizer(cfg: DataConfig, train: Pairs):
  texts = [apply_template(cfg.prompt_template, p) for p in train.prompts] + list(train.responses)
  if cfg.prompted_spm_vocab > 0:
    tok = train_tokenizer(texts, cfg.prompted_spm_vocab, cfg.prompted_spm_type)
    log.info("trained a SentencePiece %s tokenizer on %s: %d pieces", cfg.prompted_spm_type,
             train.source, tok.vocab_size)
    return tok
  return tokenizers.build(cfg.tokenizer, texts)


def check_tokenizer(tokenizer) -> int:
  eos = getattr(tokenizer, "eos_id", None)
  if eos is None:
    raise DataError(f"prompted fine-tuning needs a tokenizer with an end-of-sequence id (to end "
                    f"responses); {type(tokenizer).__name__} has none: use DataConfig.tokenizer="
                    f"'byte' or PromptedConfig.prompted_spm_vocab > 0 (a SentencePiece model)")
  return int(eos)


def encode_text(tokenizer, text: str, where: str) -> np.ndarray:
  try:
    enc = tokenizers.encode_ordinary(tokenizer, text)       # raw text: no control tokens
  except ValueError as e:
    raise DataError(f"{where}: the tokenizer cannot encode it ({e})") from None
  return np.asarray(enc, np.int32)


# ----------------------------------------------------------------------------- encoding


@dataclasses.dataclass
class Example:
  prompt: np.ndarray     # int32 [p]: template(prompt), possibly cut at the left
  response: np.ndarray   # int32 [r]: response + EOS, possibly cut at the right


def fit(prompt: np.ndarray, response: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
  """Cuts an example to seq_len + 1 tokens: the prompt keeps its end (at most half the row when
  the response needs the room), the response its start; each keeps at least one token."""
  budget = seq_len + 1
  if len(prompt) + len(response) <= budget:
    return prompt, response
  keep_p = max(1, min(len(prompt), max(budget - len(response), budget // 2)))
  return prompt[len(prompt) - keep_p:], response[:budget - keep_p]


def encode_pairs(tokenizer, template: str, pairs: Pairs, seq_len: int) -> tuple[list[Example], dict]:
  """Pairs -> examples, plus counts {"examples", "truncated" (examples cut), "truncated_prompts",
  "truncated_responses"}."""
  eos = check_tokenizer(tokenizer)
  out, cut, cut_p, cut_r = [], 0, 0, 0
  for i, (p, r) in enumerate(zip(pairs.prompts, pairs.responses)):
    where = f"{pairs.source}, example {i + 1}"
    pid = encode_text(tokenizer, apply_template(template, p), where)
    if len(pid) == 0:
      raise DataError(f"{where}: the prompt is empty after the template; give each example a "
                      f"prompt, or a PROMPT_TEMPLATE with fixed text")
    rid = np.append(encode_text(tokenizer, r, where), np.int32(eos)).astype(np.int32)
    fp, fr = fit(pid, rid, seq_len)
    cut_p += len(fp) < len(pid)
    cut_r += len(fr) < len(rid)
    cut += len(fp) + len(fr) < len(pid) + len(rid)
    out.append(Example(fp, fr))
  return out, {"examples": len(out), "truncated": cut, "truncated_prompts": cut_p,
               "truncated_responses": cut_r}


def example_arrays(ex: Example) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(inputs, targets, weights) of one example, each [len(P+R) - 1]."""
  seq = np.concatenate([ex.prompt, ex.response])
  weights = (np.arange(len(seq) - 1) >= len(ex.prompt) - 1).astype(np.float32)
  return seq[:-1], seq[1:], weights


@dataclasses.dataclass
class Rows:
  inputs: np.ndarray       # int32 [n, s]
  targets: np.ndarray      # int32 [n, s]
  positions: np.ndarray    # int32 [n, s]
  segment_ids: np.ndarray  # int32 [n, s]; 0 = padding
  weights: np.ndarray      # float32 [n, s]; 1 on response targets (and EOS)
  counts: dict

  def __len__(self):
    return len(self.inputs)


def pack(examples: list[Example], seq_len: int, packed: bool, order=None, counts=None) -> Rows:
  """Examples -> rows of seq_len: one a row, or (packed) best-fit in `order`: each example goes
  to the open row with the least room that holds it, else starts a row."""
  order = range(len(examples)) if order is None else order
  groups: list[list[tuple]] = []
  by_room: list[list[int]] = [[] for _ in range(seq_len + 1)]   # room left -> rows
  for i in order:
    arrs = example_arrays(examples[i])
    n = len(arrs[0])
    room = next((c for c in range(n, seq_len + 1) if by_room[c]), None) if packed else None
    if room is None:
      groups.append([])
      r, room = len(groups) - 1, seq_len
    else:
      r = by_room[room].pop()
    groups[r].append(arrs)
    if packed and room - n > 0:
      by_room[room - n].append(r)
  shape = (len(groups), seq_len)
  rows = Rows(np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.zeros(shape, np.int32),
              np.zeros(shape, np.int32), np.zeros(shape, np.float32), dict(counts or {}))
  for r, group in enumerate(groups):
    at = 0
    for seg, (inp, tgt, w) in enumerate(group, 1):
      sl = slice(at, at + len(inp))
      rows.inputs[r, sl], rows.targets[r, sl], rows.weights[r, sl] = inp, tgt, w
      rows.positions[r, sl] = np.arange(len(inp))
      rows.segment_ids[r, sl] = seg
      at += len(inp)
  rows.counts.update(rows=len(groups), response_tokens=int(rows.weights.sum()))
  return rows


def _pack_order(seed: int, n: int) -> np.ndarray:
  return np.random.default_rng([seed, 0x7061636b]).permutation(n)


SHUFFLE_SALT = 0x70726f6d   # this pipeline's stream of per-epoch shuffles (data.lm.epoch_rows)


@dataclasses.dataclass
class PromptedData(KeyedTable):
  shuffle_salt = SHUFFLE_SALT   # a class attribute, not a field
  cfg: DataConfig
  tokenizer: object
  train: Rows
  val: Rows
  source: str

  @classmethod
  def build(cls, cfg: DataConfig, tokenizer=None) -> "PromptedData":
    train_pairs, val_pairs = load_pairs(cfg)
    if tokenizer is None:
      tokenizer = make_tokenizer(cfg, train_pairs)
    tables = []
    for name, pairs in (("train", train_pairs), ("eval", val_pairs)):
      examples, counts = encode_pairs(tokenizer, cfg.prompt_template, pairs, cfg.seq_len)
      if counts["truncated"]:
        log.warning("%s: %d of %d examples are longer than seq_len + 1 = %d tokens and were "
                    "truncated (%d prompts cut at the left, %d responses cut at the right)",
                    pairs.source, counts["truncated"], len(examples), cfg.seq_len + 1,
                    counts["truncated_prompts"], counts["truncated_responses"])
      order = _pack_order(cfg.seed, len(examples)) if name == "train" else None
      tables.append(pack(examples, cfg.seq_len, cfg.prompted_pack, order, counts))
    train, val = tables
    log.info("prompted data: %d train examples in %d rows (%s), %d eval examples in %d rows (%s); "
             "%d train response tokens; vocab %d", len(train_pairs), len(train), train_pairs.source,
             len(val_pairs), len(val), val_pairs.source, train.counts["response_tokens"],
             tokenizer.vocab_size)
    return cls(cfg, tokenizer, train, val, train_pairs.source)

  # --- batches, a pure function of (seed, step)

  def _rows(self, rows: Rows, idx: np.ndarray, keep: np.ndarray) -> dict:
    return {"inputs": rows.inputs[idx], "targets": rows.targets[idx],
            "positions": rows.positions[idx],
            "segment_ids": rows.segment_ids[idx] * keep[:, None].astype(np.int32),
            "weights": rows.weights[idx] * keep[:, None].astype(np.float32)}

  def row_shapes(self) -> dict:
    return {k: (self.cfg.seq_len,) for k in KEYS}
