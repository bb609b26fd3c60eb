"""DP-SGD (Abadi et al. 2016): per-example clipping, Gaussian noise, and privacy accounting.

Switched on by `OptimConfig.dp_l2_clip > 0`. Inside the jitted train step (train/step.py) each
example's gradient is taken by `jax.vmap` over the batch (the batch dim stays sharded), clipped
to L2 norm `dp_l2_clip`, and the clipped gradients are summed, over microbatches too; once per
global batch Gaussian noise of std `dp_noise_multiplier * dp_l2_clip` is added to the sum, drawn
from a key that is a function of (TrainConfig.seed, step) alone, and the sum is divided by the
batch size (a constant, never the data-dependent count of rows). The optimizer (AdamW ...) then
sees only the privatized gradient, as post-processing.

Why not `optax.contrib.dpsgd` / `differentially_private_aggregate`: it takes all per-example
gradients of the batch at once ([b, *param] for every leaf), so gradient accumulation would
have to hold b copies of the model instead of b/k, and it keeps its noise key in the optimizer
state and splits it per call, so k microbatches would draw k noises (k times the variance it
accounts for) unless the noise is added once after the accumulation, which is what happens
here. Its clipping rule is the same (`optax.transforms.per_example_global_norm_clip`: g / max(1,
|g| / C)); tests/test_privacy.py checks the two agree.

Sampling (`OptimConfig.dp_sampling`):
  poisson  each step draws every train example independently with probability q = batch/n,
           truncated to `batch` rows by a random subset, padded with weight-0 rows (their gradient
           is exactly 0); accounted exactly with dp_accounting's
           TruncatedSubsampledGaussianDpEvent (PLD). Table pipelines only (classification, NER).
  shuffle  the pipeline's fixed-size batches from a per-epoch permutation, accounted AS IF Poisson
           with q = batch/n: the common practice (TF Privacy, Opacus tutorials), but not a proof
           for shuffling; Chua et al. 2024 show the true epsilon of shuffled batches can be larger.

What is private: the params (and so checkpoints and predictions). The training metrics (loss,
accuracy, clipped fraction) are computed from raw training batches and are NOT privatized; the
bad-step guard sees only the noised gradient (its loss-spike test is off under DP).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import jax
import jax.numpy as jnp

from bigmodel.config import ConfigError, OptimConfig
from bigmodel.train import accumulate


def _dp_accounting():
  """Google's dp-accounting, or a ConfigError saying how to install it."""
  try:
    import dp_accounting
  except ImportError:
    raise ConfigError("DP-SGD (OptimConfig.dp_*) accounts its privacy with Google's dp-accounting, "
                      "which is not installed: pip install -e '.[privacy]'") from None
  return dp_accounting

log = logging.getLogger(__name__)

NOISE_SALT = 0x6470   # the noise key's own stream, apart from dropout's


def enabled(cfg: OptimConfig) -> bool:
  return cfg.dp_l2_clip > 0


def check(cfg: OptimConfig) -> None:
  if cfg.dp_l2_clip < 0 or cfg.dp_noise_multiplier < 0 or cfg.dp_epsilon < 0 or cfg.dp_delta < 0:
    raise ConfigError("OptimConfig.dp_l2_clip, dp_noise_multiplier, dp_epsilon, dp_delta must be >= 0")
  if not enabled(cfg):
    if cfg.dp_noise_multiplier or cfg.dp_epsilon:
      raise ConfigError("OptimConfig.dp_noise_multiplier / dp_epsilon need DP-SGD on: set "
                        "OptimConfig.dp_l2_clip > 0 (the per-example clipping norm, e.g. 1.0)")
    return
  if cfg.dp_sampling not in ("poisson", "shuffle"):
    raise ConfigError(f"OptimConfig.dp_sampling={cfg.dp_sampling!r}: expected poisson or shuffle")
  if cfg.dp_accountant not in ("pld", "rdp"):
    raise ConfigError(f"OptimConfig.dp_accountant={cfg.dp_accountant!r}: expected pld or rdp")
  if cfg.dp_sampling == "poisson" and cfg.dp_accountant == "rdp":
    raise ConfigError("OptimConfig.dp_sampling='poisson' truncates batches, which only the PLD "
                      "accountant handles: set OptimConfig.dp_accountant='pld'")
  if cfg.dp_epsilon and cfg.dp_noise_multiplier:
    raise ConfigError("set either OptimConfig.dp_epsilon (the noise multiplier is then computed) "
                      "or OptimConfig.dp_noise_multiplier, not both")


# ----------------------------------------------------------------------------- the step's maths


def clip_by_norm(grads, clip: float):
  """(grads / max(1, |grads| / clip), |grads|): one example's gradient clipped to L2 norm
  `clip` (optax.transforms.per_example_global_norm_clip's rule)."""
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(g.astype(jnp.float32))) for g in jax.tree.leaves(grads)))
  scale = 1.0 / jnp.maximum(1.0, norm / clip)
  return jax.tree.map(lambda g: (g * scale).astype(g.dtype), grads), norm


def clipped_sum(grads_of, params, batch: dict, rng, clip: float, *, one_at_a_time: bool = False):
  """((summed loss, aux sums), sum of clipped per-example gradients, count of clipped rows).

  `grads_of(params, batch, rng)` -> ((loss_sum, aux), grads) of a batch; here it sees one
  example at a time: under vmap over the batch (the batch dim stays sharded; the accelerator
  path), or with `one_at_a_time` in a scan over the rows that adds each clipped gradient to
  one running sum (the XLA:CPU path: vmap makes every weight gradient a batched matmul, which
  XLA:CPU runs several times slower than the one example's plain matmuls, and holds b gradient
  trees). Each example's dropout key is folded from `rng` and its row index."""
  b = jax.tree.leaves(batch)[0].shape[0]

  def one(example, i):
    ex = jax.tree.map(lambda x: x[None], example)
    (loss, aux), g = grads_of(params, ex, jax.random.fold_in(rng, i))
    g, norm = clip_by_norm(g, clip)
    return (loss, aux), g, (norm > clip).astype(jnp.float32)

  if one_at_a_time:
    return accumulate.scan_sum(lambda x: one(*x), (batch, jnp.arange(b)))
  (loss, aux), g, clipped = jax.vmap(one)(batch, jnp.arange(b))
  total = lambda x: jnp.sum(x, axis=0)
  return jax.tree.map(total, (loss, aux)), jax.tree.map(total, g), jnp.sum(clipped)


def per_example_on_cpu(mesh) -> bool:
  """Whether the DP step takes its per-example gradients one at a time (XLA:CPU) rather than
  under vmap (TPU, GPU): see `clipped_sum`."""
  return mesh.devices.flat[0].platform == "cpu"


def noise_key(seed: int, step):
  return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), NOISE_SALT), step)


def noised_mean(grad_sum, rows: int, key, std: float):
  """(grad_sum + N(0, std^2) on every coordinate) / rows: the DP-SGD gradient of a batch of
  `rows` (padding rows included: a constant, so the division reveals nothing)."""
  return jax.tree.map(lambda g: g / rows, add_noise(grad_sum, key, std))


def add_noise(grad_sum, key, std: float):
  """grad_sum + N(0, std^2) on every coordinate, one subkey per leaf (in tree order)."""
  leaves, treedef = jax.tree.flatten(grad_sum)
  keys = jax.random.split(key, len(leaves))
  noised = [g + std * jax.random.normal(k, g.shape, jnp.float32).astype(g.dtype)
            for g, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, noised)


# ----------------------------------------------------------------------------- accounting


@dataclasses.dataclass(frozen=True)
class Accounting:
  """What the accountant needs: dataset size, batch, noise, sampling."""
  n: int                  # train examples
  batch: int              # TrainConfig.batch_size
  noise_multiplier: float
  delta: float
  sampling: str = "poisson"
  accountant: str = "pld"

  @property
  def q(self) -> float:
    return min(1.0, self.batch / self.n)

  def event(self, steps: int, noise_multiplier: float | None = None):
    dp_accounting = _dp_accounting()
    z = self.noise_multiplier if noise_multiplier is None else noise_multiplier
    if self.sampling == "poisson":
      one = dp_accounting.TruncatedSubsampledGaussianDpEvent(
          dataset_size=self.n, sampling_probability=self.q, truncated_batch_size=self.batch,
          noise_multiplier=z)
    else:
      one = dp_accounting.PoissonSampledDpEvent(self.q, dp_accounting.GaussianDpEvent(z))
    return dp_accounting.SelfComposedDpEvent(one, steps)

  def epsilon(self, steps: int, noise_multiplier: float | None = None) -> float:
    """Epsilon spent after `steps` steps at `delta` (inf without noise, 0 before any step)."""
    z = self.noise_multiplier if noise_multiplier is None else noise_multiplier
    if steps <= 0:
      return 0.0
    if z <= 0:
      return math.inf
    return _epsilon(self.accountant, self.event(steps, z), self.delta)


@functools.lru_cache(maxsize=256)
def _epsilon(accountant: str, event, delta: float) -> float:
  from dp_accounting.pld import pld_privacy_accountant
  from dp_accounting.rdp import rdp_privacy_accountant
  acc = (pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-3)
         if accountant == "pld" else rdp_privacy_accountant.RdpAccountant())
  return float(acc.compose(event).get_epsilon(delta))


def calibrate(acc: Accounting, steps: int, target_epsilon: float, tol: float = 1e-3) -> float:
  """The smallest noise multiplier whose epsilon after `steps` is at most `target_epsilon`
  (bisection on the accountant; epsilon falls as the multiplier grows)."""
  lo, hi = 0.0, 1.0
  while acc.epsilon(steps, hi) > target_epsilon:
    lo, hi = hi, hi * 2
    if hi > 1e4:
      raise ConfigError(f"no noise multiplier below 1e4 reaches epsilon {target_epsilon} in "
                        f"{steps} steps; raise OptimConfig.dp_epsilon or lower the steps")
  while hi - lo > tol * max(hi, 1e-3):
    mid = (lo + hi) / 2
    (hi, lo) = (mid, lo) if acc.epsilon(steps, mid) <= target_epsilon else (hi, mid)
  return hi


def accounting(cfg: OptimConfig, n: int, batch: int, steps: int) -> Accounting:
  """The run's Accounting, the noise multiplier computed from a target epsilon if one is set
  (delta 0 means 1/n)."""
  delta = cfg.dp_delta or 1.0 / n
  acc = Accounting(n, batch, cfg.dp_noise_multiplier, delta, cfg.dp_sampling, cfg.dp_accountant)
  if acc.q >= 1.0:
    raise ConfigError(f"DP-SGD: the batch ({batch}) is not smaller than the dataset ({n}): "
                      f"subsampling gives no amplification; lower TrainConfig.batch_size")
  if cfg.dp_epsilon:
    z = calibrate(acc, steps, cfg.dp_epsilon)
    acc = dataclasses.replace(acc, noise_multiplier=z)
    log.info("DP-SGD: noise multiplier %.4f gives epsilon %.3f at delta %.3g after %d steps",
             z, acc.epsilon(steps), delta, steps)
  if cfg.dp_sampling == "shuffle":
    log.warning("DP-SGD with dp_sampling='shuffle': epsilon is accounted as if batches were "
                "Poisson-sampled (q=%.3g); for shuffled fixed-size batches that is the common "
                "practice, not a guarantee. Use dp_sampling='poisson' for an exact account.", acc.q)
  return acc


def summary(acc: Accounting, steps: int, clip: float) -> dict:
  """The privacy figures of a run after `steps` steps (summary.json, checkpoint meta)."""
  return {"dp_epsilon": acc.epsilon(steps), "dp_delta": acc.delta,
          "dp_noise_multiplier": acc.noise_multiplier, "dp_l2_clip": clip,
          "dp_sampling": acc.sampling, "dp_accountant": acc.accountant,
          "dp_sampling_probability": acc.q, "dp_train_examples": acc.n}
