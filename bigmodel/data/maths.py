"""Generated data sets of the maths experiments (bigmodel/objectives/maths.py), with their
known answers. A pure function of (DataConfig.seed, MathsConfig): n = num_examples rows of
f = DataConfig.seq_len features x ~ N(0, 1), and a true [w, b] ~ N(0, 1):

  regression  y = x w + b + noise * N(0, 1); reference = numpy.linalg.lstsq([x, 1], y), the
              least-squares [w, b] that gradient descent on the mean squared error must reach
  logistic    y ~ Bernoulli(sigmoid(x w + b)); reference = the Newton's-method optimum of the
              mean binary cross-entropy (objectives.maths.newton_logistic)
  mlp         y = sin(x w) + noise * N(0, 1); no reference (zeros): the MLP experiment checks
              gradients, not an optimum

The eval split is the train set itself (the experiments measure the fit of the training
problem). Batches are keyed rows as in `data/lm.py` (`KeyedTable`): a batch of all n rows is
full-batch gradient descent; resuming is exact.

Batch (numpy, this host's rows): x float32 [b, f]; y, weights float32 [b]; reference
float32 [b, f + 1].
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
from bigmodel.data import tf  # accelerators hidden from it: see bigmodel/data/__init__.py

from bigmodel.data import tokenizers
from bigmodel.data.lm import KeyedTable, keyed_batches
from bigmodel.data.sources import DataError

log = logging.getLogger(__name__)

KEYS = ("x", "y", "reference", "weights")
KINDS = ("regression", "logistic", "mlp")
SHUFFLE_SALT = 0x6d617468


class NoTokenizer(tokenizers.ByteTokenizer):
  """Rows of numbers have no tokens; the trainer still saves a tokenizer to the workdir."""
  vocab_size = 0


@dataclasses.dataclass
class Table:
  x: np.ndarray
  y: np.ndarray

  def __len__(self):
    return len(self.y)


def generate(kind: str, n: int, f: int, seed: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
  """(x float32 [n, f], y float32 [n]) of one kind of problem."""
  if kind not in KINDS:
    raise DataError(f"maths data: kind {kind!r}; expected one of {KINDS}")
  rng = np.random.default_rng([seed, KINDS.index(kind)])
  x = rng.standard_normal((n, f))
  w, b = rng.standard_normal(f), rng.standard_normal()
  if kind == "regression":
    y = x @ w + b + noise * rng.standard_normal(n)
  elif kind == "logistic":
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-(x @ w + b)))).astype(np.float64)
  else:
    y = np.sin(x @ w) + noise * rng.standard_normal(n)
  return x.astype(np.float32), y.astype(np.float32)


def reference(kind: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """The known answer [w, b] (float32 [f + 1]; zeros for `mlp`)."""
  if kind == "regression":
    x1 = np.concatenate([x, np.ones((len(x), 1), np.float32)], 1).astype(np.float64)
    return np.linalg.lstsq(x1, y.astype(np.float64), rcond=None)[0].astype(np.float32)
  if kind == "logistic":
    import jax.numpy as jnp
    from bigmodel.objectives.maths import newton_logistic
    return np.asarray(newton_logistic(jnp.asarray(x), jnp.asarray(y)), np.float32)
  return np.zeros(x.shape[1] + 1, np.float32)


@dataclasses.dataclass
class MathsData(KeyedTable):
  shuffle_salt = SHUFFLE_SALT   # a class attribute, not a field
  cfg: object
  tokenizer: object
  train: Table
  val: Table
  answer: np.ndarray

  @classmethod
  def build(cls, cfg, kind: str) -> "MathsData":
    if cfg.num_examples < 2 or cfg.seq_len < 1:
      raise DataError(f"maths data: MathsConfig.num_examples={cfg.num_examples} rows of "
                      f"SEQ_LEN={cfg.seq_len} features; need at least 2 rows and 1 feature")
    x, y = generate(kind, cfg.num_examples, cfg.seq_len, cfg.seed, cfg.noise)
    answer = reference(kind, x, y)
    log.info("maths data: %s, %d rows of %d features (seed %d)", kind, len(y), x.shape[1], cfg.seed)
    table = Table(x, y)
    return cls(cfg, NoTokenizer(), table, table, answer)

  def _rows(self, table: Table, idx: np.ndarray, real: np.ndarray) -> dict:
    return {"x": table.x[idx], "y": table.y[idx],
            "reference": np.broadcast_to(self.answer, (len(idx), len(self.answer))).copy(),
            "weights": real.astype(np.float32)}

  def row_shapes(self) -> dict:
    f = self.train.x.shape[1]
    return {"x": (f,), "y": (), "reference": (f + 1,), "weights": ()}

  def train_batches(self, global_batch: int, start_step: int = 0, host_rows=None) -> tf.data.Dataset:
    stop = np.iinfo(np.int64).max // (2 * global_batch)
    return keyed_batches(self.train_rows, self.row_shapes(), KEYS, global_batch, start_step,
                         stop, host_rows)

  def eval_batches(self, global_batch: int, host_rows=None) -> tf.data.Dataset:
    steps = -(-len(self.val) // global_batch)
    return keyed_batches(self.eval_rows, self.row_shapes(), KEYS, global_batch, 0, steps,
                         host_rows)
