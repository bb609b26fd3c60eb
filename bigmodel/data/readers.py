"""Readers for task data a user points at without writing code.

  read_table(path, ...)            TSV / CSV / JSONL rows as dicts (header line, or COLUMN_NAMES
                                   for headerless files); the format follows the extension.
                                   `tfds:NAME:SPLIT` (e.g. `tfds:glue/sst2:validation`) reads a
                                   TFDS split instead, one dict per example (tfds_rows)
  read_classification(path, ...)   (texts: tuple per row of the chosen text column(s), labels)
  LabelSet                         labels inferred from the training file (sorted; numerically
                                   when all are integers) or given; an unseen label names itself
  read_conll(path, ...)            CoNLL column files -> sentences of (tokens, tags)
  read_squad(path)                 SQuAD v1.1 JSON -> one record per question
  read_parallel(src, tgt)          line-aligned parallel files -> (source, target) pairs

Every failure is a DataError that names the file (and the line where there is one).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from typing import Sequence

from bigmodel import storage
from bigmodel.data.sources import DataError, tfds_examples

FORMATS = ("tsv", "csv", "jsonl")


TFDS_PREFIX = "tfds:"


def resolve(path: str, data_dir: str = "") -> str:
  """A relative path that does not exist here is read under data_dir (`tfds:` specs stay)."""
  if path.startswith(TFDS_PREFIX):
    return path
  if path and not os.path.isabs(path) and not storage.is_remote(path) and \
      not os.path.exists(path) and data_dir:
    return storage.join(data_dir, path)
  return path


def _read_text(path: str) -> str:
  if not storage.exists(path):
    raise DataError(f"{path}: no such file")
  text = storage.read_text(path, encoding="utf-8-sig", newline="")
  if not text.strip():
    raise DataError(f"{path}: the file is empty")
  return text


def file_format(path: str, fmt: str = "") -> str:
  if fmt:
    if fmt not in FORMATS:
      raise DataError(f"{path}: format {fmt!r} unknown; expected one of {FORMATS}")
    return fmt
  ext = os.path.splitext(path)[1].lower().lstrip(".")
  if ext in ("tsv", "txt"):
    return "tsv"
  if ext == "csv":
    return "csv"
  if ext in ("jsonl", "json", "ndjson"):
    return "jsonl"
  raise DataError(f"{path}: cannot tell the format from the extension {ext!r}; name it .tsv, "
                  f".csv or .jsonl (or set the format)")


def parse_tfds_spec(spec: str) -> tuple[str, str]:
  """`tfds:glue/sst2:validation` -> ("glue/sst2", "validation")."""
  body = spec[len(TFDS_PREFIX):]
  name, _, split = body.rpartition(":")
  if not name or not split:
    raise DataError(f"{spec!r}: a TFDS source is written tfds:NAME:SPLIT, e.g. "
                    f"tfds:glue/sst2:train or tfds:glue/sst2:validation")
  return name, split


def _tfds_value(v):
  if isinstance(v, bytes):
    return v.decode("utf-8")
  if hasattr(v, "tolist"):
    v = v.tolist()
    if isinstance(v, list):
      return [x.decode("utf-8") if isinstance(x, bytes) else x for x in v]
  return v


def tfds_rows(spec: str, data_dir: str | None = None) -> list[dict]:
  """Every example of a TFDS split as a dict (bytes decoded to str, arrays to lists).

  ClassLabel features stay integer ids, as in the datasets' own files (GLUE TSVs)."""
  name, split = parse_tfds_spec(spec)
  examples = tfds_examples(name, split, data_dir,
                           "point the recipe at local files under the data directory instead")
  rows = [{k: _tfds_value(v) for k, v in ex.items()} for ex in examples]
  if not rows:
    raise DataError(f"{spec}: the TFDS split is empty")
  return rows


def read_table(path: str, column_names: Sequence[str] = (), fmt: str = "") -> list[dict]:
  """Rows of a TSV, CSV or JSONL file as dicts of strings (JSONL values as parsed), or of a
  TFDS split named `tfds:NAME:SPLIT`.

  column_names: the columns of a headerless TSV/CSV file (else its first line is the header).
  """
  if path.startswith(TFDS_PREFIX):
    return tfds_rows(path)
  fmt = file_format(path, fmt)
  text = _read_text(path)
  if fmt == "jsonl":
    return _read_jsonl(path, text)
  if fmt == "tsv":
    # GLUE-style TSV: no quoting (SST-2 sentences hold bare quotes)
    reader = csv.reader(io.StringIO(text), delimiter="\t", quoting=csv.QUOTE_NONE)
  else:
    reader = csv.reader(io.StringIO(text), strict=True)
  rows, header = [], list(column_names) or None
  try:
    for fields in reader:
      if not fields or (len(fields) == 1 and not fields[0].strip()):
        continue
      if header is None:
        header = [h.strip() for h in fields]
        if len(set(header)) != len(header):
          raise DataError(f"{path}: the header repeats a column name: {header}")
        continue
      if len(fields) != len(header):
        raise DataError(f"{path}, line {reader.line_num}: {len(fields)} fields where the "
                        f"{'header' if not column_names else 'COLUMN_NAMES'} has {len(header)} "
                        f"({header})")
      rows.append(dict(zip(header, fields)))
  except csv.Error as e:
    raise DataError(f"{path}, line {reader.line_num}: malformed {fmt.upper()} ({e})") from None
  if not rows:
    raise DataError(f"{path}: the file has a header but no rows" if header else f"{path}: the file is empty")
  return rows


def _read_jsonl(path: str, text: str) -> list[dict]:
  rows = []
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}, line {n}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
      raise DataError(f"{path}, line {n}: expected a JSON object per line, got {type(obj).__name__}")
    rows.append(obj)
  if not rows:
    raise DataError(f"{path}: the file is empty")
  return rows


def _columns(rows: list[dict]) -> list[str]:
  cols: dict[str, None] = {}
  for r in rows[:1000]:
    cols.update(dict.fromkeys(r))
  return list(cols)


def read_classification(path: str, text_columns: Sequence[str], label_column: str = "",
                        column_names: Sequence[str] = (), fmt: str = ""
                        ) -> tuple[list[tuple[str, ...]], list[str] | None]:
  """(texts, labels): per row a tuple of its text column(s) (one: a sentence; two: a pair),
  and its label as a string (None when label_column is empty, e.g. for prediction)."""
  if isinstance(text_columns, str):
    text_columns = (text_columns,)
  if not text_columns or len(text_columns) > 2:
    raise DataError(f"{path}: name one text column (a sentence) or two (a pair); got {list(text_columns)}")
  rows = read_table(path, column_names, fmt)
  have = _columns(rows)
  wanted = list(text_columns) + ([label_column] if label_column else [])
  missing = [c for c in wanted if c not in have]
  if missing:
    raise DataError(f"{path}: no column {missing[0]!r} (columns: {have}); set TEXT_COLUMNS / "
                    f"LABEL_COLUMN (or COLUMN_NAMES for a headerless file)")
  texts, labels = [], [] if label_column else None
  for i, r in enumerate(rows):
    for c in wanted:
      if c not in r or r[c] is None:
        raise DataError(f"{path}: row {i + 1} has no value for column {c!r}")
    texts.append(tuple(str(r[c]) for c in text_columns))
    if label_column:
      labels.append(_label_str(r[label_column]))
  return texts, labels


def _label_str(v) -> str:
  if isinstance(v, float) and v.is_integer():
    v = int(v)
  return str(v).strip()


@dataclasses.dataclass(frozen=True)
class LabelSet:
  names: tuple[str, ...]

  @classmethod
  def infer(cls, labels: Sequence[str]) -> "LabelSet":
    distinct = set(labels)
    try:
      names = sorted(distinct, key=int)
    except ValueError:
      names = sorted(distinct)
    return cls(tuple(names))

  def __len__(self):
    return len(self.names)

  def ids(self, labels: Sequence[str], path: str = "") -> list[int]:
    index = {n: i for i, n in enumerate(self.names)}
    out = []
    for i, lab in enumerate(labels):
      if lab not in index:
        shown = list(self.names) if len(self.names) <= 20 else list(self.names[:20]) + ["..."]
        raise DataError(f"{path or 'data'}: row {i + 1} has the label {lab!r}, not in the label set "
                        f"{shown} (inferred from the training file, or LABELS)")
      out.append(index[lab])
    return out


# ----------------------------------------------------------------------------- CoNLL


def read_conll(path: str, token_column: int = 0, tag_column: int = -1
               ) -> list[tuple[list[str], list[str]]]:
  """Sentences of a CoNLL column file (blank lines between sentences, `-DOCSTART-` lines
  skipped, a missing final newline tolerated)."""
  text = _read_text(path)
  sentences, tokens, tags = [], [], []
  for n, line in enumerate(text.splitlines(), 1):
    fields = line.split()
    if not fields:
      if tokens:
        sentences.append((tokens, tags))
        tokens, tags = [], []
      continue
    if fields[0] == "-DOCSTART-":
      continue
    try:
      tok, tag = fields[token_column], fields[tag_column]
    except IndexError:
      raise DataError(f"{path}, line {n}: {len(fields)} columns, but the token column is "
                      f"{token_column} and the tag column {tag_column}") from None
    tokens.append(tok)
    tags.append(tag)
  if tokens:
    sentences.append((tokens, tags))
  if not sentences:
    raise DataError(f"{path}: no sentences (only -DOCSTART- or blank lines)")
  return sentences


# ----------------------------------------------------------------------------- SQuAD


def read_squad(path: str) -> list[dict]:
  """SQuAD v1.1 JSON -> [{"id", "title", "context", "question", "answers": [texts],
  "answer_starts": [char offsets]}] in file order."""
  text = _read_text(path)
  try:
    obj = json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f"{path}, line {e.lineno}: malformed JSON ({e.msg})") from None
  if not isinstance(obj, dict) or not isinstance(obj.get("data"), list):
    raise DataError(f"{path}: not SQuAD v1.1 JSON (expected {{\"data\": [articles]}})")
  out = []
  try:
    for a, article in enumerate(obj["data"]):
      for paragraph in article["paragraphs"]:
        context = paragraph["context"]
        for qa in paragraph["qas"]:
          answers = qa.get("answers", [])
          out.append({"id": str(qa["id"]), "title": article.get("title", str(a)),
                      "context": context, "question": qa["question"],
                      "answers": [x["text"] for x in answers],
                      "answer_starts": [int(x["answer_start"]) for x in answers]})
  except (KeyError, TypeError) as e:
    raise DataError(f"{path}: not SQuAD v1.1 JSON: article {a} lacks {e}") from None
  if not out:
    raise DataError(f"{path}: no questions")
  return out


# ----------------------------------------------------------------------------- parallel text


def read_parallel(source_path: str, target_path: str) -> list[tuple[str, str]]:
  src = _read_text(source_path).splitlines()
  tgt = _read_text(target_path).splitlines()
  if len(src) != len(tgt):
    raise DataError(f"{source_path} has {len(src)} lines but {target_path} has {len(tgt)}: "
                    f"parallel files must be line-aligned")
  for n, (s, t) in enumerate(zip(src, tgt), 1):
    if not s.strip() or not t.strip():
      raise DataError(f"{source_path} / {target_path}, line {n}: an empty side")
  return list(zip(src, tgt))
