"""Task metrics against hand-computed cases."""

import math

import pytest

from bigmodel.evaluation import metrics as M


def test_accuracy_and_macro_f1():
  gold = ["a", "a", "b", "c"]
  pred = ["a", "b", "b", "a"]
  assert M.accuracy(gold, pred) == 0.5
  # a: tp1 fp1 fn1 -> 0.5; b: tp1 fp1 -> 2/3; c: fn1 -> 0
  assert M.per_class_f1(gold, pred) == pytest.approx({"a": 0.5, "b": 2 / 3, "c": 0.0})
  assert M.macro_f1(gold, pred) == pytest.approx((0.5 + 2 / 3 + 0) / 3)
  assert M.macro_f1([1, 1], [1, 1]) == 1.0
  with pytest.raises(ValueError, match="differ in length"):
    M.accuracy([1], [1, 2])


def test_entities_conlleval_chunks():
  # I- without B- starts an entity (conlleval), as does I- of another type.
  assert M.entities(["I-PER", "I-PER", "O", "I-LOC"]) == [("PER", 0, 1), ("LOC", 3, 3)]
  assert M.entities(["B-PER", "I-LOC", "I-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2)]
  # adjacent entities of the same type split at B-
  assert M.entities(["B-ORG", "B-ORG", "I-ORG", "O"]) == [("ORG", 0, 0), ("ORG", 1, 2)]
  assert M.entities(["O", "O"]) == []
  assert M.entities(["B-MISC"]) == [("MISC", 0, 0)]
  # IOBES too
  assert M.entities(["S-PER", "B-LOC", "E-LOC"]) == [("PER", 0, 0), ("LOC", 1, 2)]


def test_entity_f1_hand_computed():
  gold = [["B-PER", "I-PER", "O", "B-LOC"],
          ["B-ORG", "B-ORG", "O"]]
  pred = [["I-PER", "I-PER", "O", "B-ORG"],       # PER right (I- start), LOC typed as ORG
          ["B-ORG", "I-ORG", "O"]]                # two adjacent ORGs merged into one: wrong
  r = M.entity_f1(gold, pred)
  # gold: PER(0,0-1) LOC(0,3) ORG(1,0) ORG(1,1) = 4; pred: PER, ORG(0,3), ORG(1,0-1) = 3; tp = 1
  assert r["precision"] == pytest.approx(1 / 3)
  assert r["recall"] == pytest.approx(1 / 4)
  assert r["f1"] == pytest.approx(2 * (1 / 3) * (1 / 4) / (1 / 3 + 1 / 4))
  assert r["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
  assert r["per_type"]["LOC"]["recall"] == 0.0 and r["per_type"]["LOC"]["support"] == 1
  assert r["per_type"]["ORG"]["precision"] == 0.0 and r["per_type"]["ORG"]["support"] == 2
  assert M.entity_f1([["B-PER", "O"]], [["B-PER", "O"]])["f1"] == 1.0
  with pytest.raises(ValueError, match="sentence 0"):
    M.entity_f1([["O"]], [["O", "O"]])


def test_entity_f1_boundary_mismatch_is_wrong():
  # a predicted entity one token too long is neither precise nor recalled
  r = M.entity_f1([["B-LOC", "O"]], [["B-LOC", "I-LOC"]])
  assert r["precision"] == 0.0 and r["recall"] == 0.0 and r["f1"] == 0.0


def test_squad_normalization_and_scores():
  assert M.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
  assert M.normalize_answer("an apple, a pear") == "apple pear"
  assert M.squad_exact("the Denver Broncos", "Denver Broncos.") == 1.0
  # pred tokens: denver broncos won; gold: denver broncos -> p 2/3, r 1 -> f1 0.8
  assert M.squad_f1("Denver Broncos won", "Denver Broncos") == pytest.approx(0.8)
  assert M.squad_f1("nothing", "Denver") == 0.0
  preds = {"q1": "Denver Broncos", "q2": "in 1990", "q3": "blue"}
  answers = {"q1": ["Broncos", "the Denver Broncos"], "q2": ["1990", "in the 1990s"],
             "q3": ["red"], "q4": ["missing"]}
  r = M.squad_em_f1(preds, answers)
  # q1: EM 1 F1 1; q2: EM 0, F1 max(2/3 vs "1990": p1/2 r1 -> 2/3; vs "in 1990s": 1/2) = 2/3;
  # q3: 0; q4: no prediction -> 0
  assert r["exact_match"] == pytest.approx(25.0)
  assert r["f1"] == pytest.approx(100 * (1 + 2 / 3) / 4)


def test_bleu_sacrebleu():
  assert M.bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
  assert M.bleu(["a b c d"], ["w x y z"]) == pytest.approx(0.0)
  # hand computed: hyp "the cat sat on mat" vs ref "the cat sat on the mat":
  # precisions 5/5, 3/4, 2/3, 1/2; BP = exp(1 - 6/5)
  expected = 100 * math.exp(1 - 6 / 5) * (1 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25
  assert M.bleu(["the cat sat on mat"], ["the cat sat on the mat"]) == pytest.approx(expected, rel=1e-4)


def test_perplexity():
  assert M.perplexity(0.0, 10) == 1.0
  assert M.perplexity(10 * math.log(4), 10) == pytest.approx(4.0)
  assert M.perplexity_from_logprobs([math.log(0.5), math.log(0.125)]) == pytest.approx(4.0)
  with pytest.raises(ValueError):
    M.perplexity(1.0, 0)
