"""File-format readers on tiny fixtures, and their errors."""

import json

import pytest

from bigmodel.data import readers as R
from bigmodel.data.sources import DataError


def _w(tmp_path, name, text):
  p = tmp_path / name
  p.write_text(text, encoding="utf-8")
  return str(p)


def test_tsv_with_header_keeps_bare_quotes(tmp_path):
  p = _w(tmp_path, "train.tsv", 'sentence\tlabel\nit \'s "great" \t1\nbad movie \t0\n')
  texts, labels = R.read_classification(p, ["sentence"], "label")
  assert texts == [('it \'s "great" ',), ("bad movie ",)]
  assert labels == ["1", "0"]


def test_csv_quoted_multiline_and_pairs(tmp_path):
  p = _w(tmp_path, "d.csv", 'q,a,y\n"hello, there","line one\nline two",yes\nx,z,no\n')
  texts, labels = R.read_classification(p, ["q", "a"], "y")
  assert texts == [("hello, there", "line one\nline two"), ("x", "z")]
  assert labels == ["yes", "no"]


def test_headerless_with_column_names(tmp_path):
  p = _w(tmp_path, "d.tsv", "0\tgood\n1\tbad")        # no final newline
  texts, labels = R.read_classification(p, ["text"], "label", column_names=["label", "text"])
  assert texts == [("good",), ("bad",)] and labels == ["0", "1"]


def test_jsonl(tmp_path):
  p = _w(tmp_path, "d.jsonl", '{"text": "a", "label": 2}\n\n{"text": "b", "label": 10}\n')
  texts, labels = R.read_classification(p, "text", "label")
  assert texts == [("a",), ("b",)] and labels == ["2", "10"]
  ls = R.LabelSet.infer(labels + ["1"])
  assert ls.names == ("1", "2", "10")          # numeric order
  assert ls.ids(["10", "1"]) == [2, 0]


def test_label_set_inferred_and_unseen_label(tmp_path):
  ls = R.LabelSet.infer(["pos", "neg", "pos"])
  assert ls.names == ("neg", "pos") and len(ls) == 2
  with pytest.raises(DataError, match=r"dev.tsv: row 2 has the label 'neutral'"):
    ls.ids(["pos", "neutral"], "dev.tsv")


def test_missing_column_names_file_and_columns(tmp_path):
  p = _w(tmp_path, "t.csv", "text,category\nhi,a\n")
  with pytest.raises(DataError, match=r"t.csv: no column 'label' \(columns: \['text', 'category'\]\)"):
    R.read_classification(p, ["text"], "label")


def test_empty_files(tmp_path):
  for name in ("e.tsv", "e.csv", "e.jsonl", "e.conll", "e.json"):
    p = _w(tmp_path, name, "\n  \n")
    read = {"conll": R.read_conll, "json": R.read_squad}.get(name.split(".")[1], R.read_table)
    with pytest.raises(DataError, match="is empty"):
      read(p)
  p = _w(tmp_path, "h.tsv", "sentence\tlabel\n")
  with pytest.raises(DataError, match="header but no rows"):
    R.read_table(p)


def test_malformed_lines_give_line_numbers(tmp_path):
  p = _w(tmp_path, "bad.jsonl", '{"text": "a", "label": 1}\n{"text": "b", label: 1}\n')
  with pytest.raises(DataError, match=r"bad.jsonl, line 2: malformed JSON"):
    R.read_table(p)
  p = _w(tmp_path, "bad.csv", 'text,label\nok,1\ntoo,many,fields\n')
  with pytest.raises(DataError, match=r"bad.csv, line 3: 3 fields"):
    R.read_table(p)
  p = _w(tmp_path, "bad2.csv", 'text,label\nok,1\n"unclosed,1\n')
  with pytest.raises(DataError, match=r"bad2.csv, line \d+: malformed CSV"):
    R.read_table(p)
  with pytest.raises(DataError, match="cannot tell the format"):
    R.read_table(_w(tmp_path, "x.parquet", "a"))


def test_conll(tmp_path):
  text = ("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\n\n"
          "Peter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER")          # no final newline
  p = _w(tmp_path, "c.txt", text)
  assert R.read_conll(p) == [(["EU", "rejects"], ["B-ORG", "O"]),
                             (["Peter", "Blackburn"], ["B-PER", "I-PER"])]
  assert R.read_conll(p, 0, 1)[0][1] == ["NNP", "VBZ"]
  with pytest.raises(DataError, match=r"c.txt, line 3: 4 columns"):
    R.read_conll(p, 0, 7)


def test_squad(tmp_path):
  data = {"version": "1.1", "data": [{"title": "T", "paragraphs": [
      {"context": "Paris is in France.", "qas": [
          {"id": "q1", "question": "Where is Paris?", "answers": [
              {"text": "France", "answer_start": 12}, {"text": "in France", "answer_start": 9}]}]}]}]}
  p = _w(tmp_path, "s.json", json.dumps(data))
  (rec,) = R.read_squad(p)
  assert rec["answers"] == ["France", "in France"] and rec["answer_starts"] == [12, 9]
  assert rec["context"][12:18] == "France" and rec["title"] == "T"
  with pytest.raises(DataError, match="not SQuAD"):
    R.read_squad(_w(tmp_path, "n.json", '{"x": 1}'))
  with pytest.raises(DataError, match=r"m.json, line 2: malformed JSON"):
    R.read_squad(_w(tmp_path, "m.json", '{"data":\n [,]}'))


def test_parallel(tmp_path):
  s = _w(tmp_path, "a.en", "a dog\na cat\n")
  t = _w(tmp_path, "a.de", "ein Hund\neine Katze")
  assert R.read_parallel(s, t) == [("a dog", "ein Hund"), ("a cat", "eine Katze")]
  with pytest.raises(DataError, match="line-aligned"):
    R.read_parallel(s, _w(tmp_path, "b.de", "ein Hund\n"))


def test_real_files_read(shared_data):
  texts, labels = R.read_classification(str(shared_data / "sst2" / "dev.tsv"), ["sentence"], "label")
  assert len(texts) == 872 and set(labels) == {"0", "1"}
  texts, labels = R.read_classification(str(shared_data / "banking77" / "test.csv"), ["text"], "category")
  assert len(texts) == 3080 and len(set(labels)) == 77
  assert len(R.read_conll(str(shared_data / "conll2003" / "test.txt"))) == 3453
  assert len(R.read_squad(str(shared_data / "squad_xquad_en" / "xquad.en.json"))) == 1190
