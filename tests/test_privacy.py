"""Privacy: DP-SGD maths (clipping, noise, the sharded/accumulated step against a one-device
reference), the accountant against dp_accounting's own figures, Poisson batches, and the PII
scrubber's cases."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from bigmodel import sharding
from bigmodel.config import ConfigError, DataConfig, MeshConfig, OptimConfig
from bigmodel.data import lm as lm_data
from bigmodel.objectives import classification
from bigmodel.train import dp, frozen, state as state_lib, step as step_lib


# ----------------------------------------------------------------------------- clipping and noise


def _linear_grads_of(params, batch, rng):
  """Loss sum_i w_i * <x_i, params["w"]>: example i's gradient is w_i * x_i."""
  del rng
  def f(p):
    loss = jnp.sum(batch["weights"] * (batch["x"] @ p["w"]))
    return loss, {"weight": jnp.sum(batch["weights"])}
  return jax.value_and_grad(f, has_aux=True)(params)


@pytest.mark.parametrize("one_at_a_time", [False, True], ids=["vmap", "scan"])
def test_clipped_sum_clips_each_example_and_matches_optax(one_at_a_time):
  """Both ways of taking per-example gradients (vmap: TPU and GPU; a scan over the rows: CPU)."""
  x = jnp.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [6.0, 8.0]])   # norms 5, 0.5, 0, 10
  batch = {"x": x, "weights": jnp.array([1.0, 1.0, 1.0, 0.0])}       # the last row is padding
  params = {"w": jnp.zeros(2)}
  clipped_sum = jax.jit(lambda p, b: dp.clipped_sum(_linear_grads_of, p, b, jax.random.key(0), 1.0,
                                                    one_at_a_time=one_at_a_time))
  (loss, aux), g, clipped = clipped_sum(params, batch)
  # [3,4] -> [0.6,0.8]; [0.3,0.4] kept; the padding row's gradient is exactly 0
  np.testing.assert_allclose(g["w"], [0.9, 1.2], rtol=1e-6)
  assert float(clipped) == 1.0 and float(aux["weight"]) == 3.0
  # optax's DP aggregate (noise 0) takes per-example grads [b, ...] and gives the mean
  per_example = {"w": x * batch["weights"][:, None]}
  agg = optax.contrib.differentially_private_aggregate(1.0, 0.0, key=jax.random.key(0))
  ref, _ = agg.update(per_example, agg.init(params))
  np.testing.assert_allclose(ref["w"] * 4, g["w"], rtol=1e-6)


def test_noise_has_std_multiplier_times_clip_and_depends_on_step_only():
  zeros = {"a": jnp.zeros((200, 100)), "b": jnp.zeros((5000,))}
  noised = jax.jit(lambda z, step: dp.add_noise(z, dp.noise_key(0, step), 2.5))
  out = noised(zeros, 3)
  for leaf in jax.tree.leaves(out):
    assert abs(float(jnp.std(leaf)) - 2.5) < 0.1 and abs(float(jnp.mean(leaf))) < 0.1
  again, other = noised(zeros, 3), noised(zeros, 4)
  np.testing.assert_array_equal(out["a"], again["a"])
  assert not np.allclose(out["a"], other["a"])
  assert not np.allclose(out["a"][:, :50], out["a"][:, 50:])   # no repeats within a leaf


# ----------------------------------------------------------------------------- the sharded step


class _Tiny(nn.Module):
  """Embed -> mean -> MLP -> 3 classes, its weights on the fsdp and tensor axes."""

  @nn.compact
  def __call__(self, ids, deterministic=True):
    part = lambda *names: nn.with_logical_partitioning(nn.initializers.normal(0.5), names)
    h = nn.Embed(64, 16, embedding_init=part("vocab", "embed"))(ids).mean(1)
    h = nn.relu(nn.Dense(32, kernel_init=part("embed", "mlp"))(h))
    return nn.Dense(3, kernel_init=part("mlp", "classes"))(h)


def _loss(model, params, batch, deterministic=True, rngs=None):
  logits = model.apply({"params": params}, batch["input_ids"])
  return classification.weighted_xent(logits, batch["labels"], batch["weights"])


def _batch(seed: int = 0, pad: int = 3) -> dict:
  rng = np.random.default_rng(seed)
  weights = np.ones(16, np.float32)
  weights[-pad:] = 0.0
  return {"input_ids": rng.integers(1, 64, (16, 8)).astype(np.int32),
          "labels": rng.integers(0, 3, 16).astype(np.int32), "weights": weights}


def _two_steps(mesh_cfg: MeshConfig, microbatches: int, devices, noise: float, vmap: bool = False):
  mesh = sharding.make_mesh(mesh_cfg, devices)
  model, tx = _Tiny(), optax.adam(1e-2)
  args = (jnp.zeros((16 // microbatches, 8), jnp.int32),)
  _, state_sh = state_lib.state_shardings(model, tx, args, mesh)
  state = state_lib.init_state(model, tx, args, mesh, jax.random.key(0))
  step = step_lib.make_train_step(model, tx, lambda s: 1e-2, _loss, mesh, state_sh,
                                  microbatches=microbatches, seed=0, dp_clip=0.5, dp_noise=noise,
                                  dp_one_at_a_time=not vmap)
  for s in range(2):
    state, metrics = step(state, lm_data.to_global(_batch(s), sharding.batch_sharding(mesh)))
  return jax.device_get(state.params), jax.device_get(metrics)


@pytest.mark.parametrize("vmap", [False, True], ids=["scan", "vmap"])
def test_dp_step_on_a_mesh_with_microbatches_equals_one_device(vmap):
  """The clipped, noised update of a 2x2x2 (data, fsdp, tensor) mesh with 2 microbatches equals
  that of one device with one microbatch: per-example clipping is per example, the noise is
  drawn once per global batch from the step's key, the sum is divided by the batch size."""
  ref, m_ref = _two_steps(MeshConfig(), 1, jax.devices()[:1], noise=0.7)
  assert 0 < float(m_ref["dp_clipped_fraction"]) <= 1.0
  got, m = _two_steps(MeshConfig(data=2, fsdp=2, tensor=2), 2, None, noise=0.7, vmap=vmap)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)
  assert float(m["dp_clipped_fraction"]) == pytest.approx(float(m_ref["dp_clipped_fraction"]))
  assert float(m["grad_norm"]) == pytest.approx(float(m_ref["grad_norm"]), rel=1e-4)
  # the noise is in the update: N(0, (0.7 * 0.5 / 16)^2) on ~1.6k coordinates has norm ~0.9,
  # above the clipped mean's bound 0.5 * 13/16
  assert float(m_ref["grad_norm"]) > 0.5


def _frozen_step(pattern: tuple, dp_clip: float):
  """One step of _Tiny with Adam on one device, `pattern` frozen: (params before, after, state)."""
  mesh = sharding.make_mesh(MeshConfig(), jax.devices()[:1])
  model, tx = _Tiny(), frozen.freeze(optax.adam(1e-2), pattern)
  args = (jnp.zeros((16, 8), jnp.int32),)
  _, state_sh = state_lib.state_shardings(model, tx, args, mesh)
  state = state_lib.init_state(model, tx, args, mesh, jax.random.key(0))
  before = jax.device_get(state.params)
  step = step_lib.make_train_step(model, tx, lambda s: 1e-2, _loss, mesh, state_sh, seed=0,
                                  dp_clip=dp_clip, dp_noise=0.7 if dp_clip else 0.0,
                                  frozen=pattern)
  state, _ = step(state, lm_data.to_global(_batch(0), sharding.batch_sharding(mesh)))
  return before, jax.device_get(state.params), state.opt_state


@pytest.mark.parametrize("dp_clip", [0.0, 0.5])
def test_frozen_params_get_no_gradient_noise_state_or_update(dp_clip):
  """OptimConfig.frozen_params: the frozen table is exactly unchanged (no update, no DP noise),
  the optimizer keeps no moments for it, every other leaf trains; without DP the other leaves'
  updates are those of the unfrozen run (freezing changes no other gradient)."""
  pattern = ("Embed_0/embedding",)
  before, after, opt_state = _frozen_step(pattern, dp_clip)
  np.testing.assert_array_equal(after["Embed_0"]["embedding"], before["Embed_0"]["embedding"])
  for name in ("Dense_0", "Dense_1"):
    assert not np.allclose(after[name]["kernel"], before[name]["kernel"])
  trained = sum(x.size for x in jax.tree.leaves(frozen.trainable(before, pattern)))
  assert sum(x.size for x in jax.tree.leaves(opt_state)) == 2 * trained + 1   # mu, nu, count
  if not dp_clip:
    _, ref, _ = _frozen_step((), 0.0)          # nothing frozen
    for name in ("Dense_0", "Dense_1"):
      np.testing.assert_allclose(after[name]["kernel"], ref[name]["kernel"], rtol=1e-5, atol=1e-7)
  with pytest.raises(ConfigError, match="matches no parameter path"):
    frozen.check(before, ("embed/embedding",))


# ----------------------------------------------------------------------------- accounting


def test_accountant_matches_dp_accounting_reference_numbers():
  import dp_accounting
  from dp_accounting.rdp import rdp_privacy_accountant
  # RDP, shuffle accounted as Poisson: the same composed event through the library directly
  acc = dp.Accounting(n=60000, batch=256, noise_multiplier=1.1, delta=1e-5, sampling="shuffle",
                      accountant="rdp")
  event = dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
      256 / 60000, dp_accounting.GaussianDpEvent(1.1)), 14070)
  ref = rdp_privacy_accountant.RdpAccountant().compose(event).get_epsilon(1e-5)
  assert acc.epsilon(14070) == pytest.approx(ref, rel=1e-9)
  # MNIST-like setting (q=0.01, sigma 4, 10k steps, delta 1e-5): dp_accounting 0.6's RDP figure
  assert dp.Accounting(60000, 600, 4.0, 1e-5, "shuffle", "rdp").epsilon(10000) == pytest.approx(
      1.0355, rel=1e-3)
  assert acc.epsilon(0) == 0.0 and math.isinf(acc.epsilon(10, 0.0))


def test_calibrated_noise_multiplier_reaches_the_target_epsilon():
  acc = dp.Accounting(n=2000, batch=20, noise_multiplier=0.0, delta=1 / 2000, sampling="poisson")
  z = dp.calibrate(acc, 50, 3.0, tol=1e-2)
  assert acc.epsilon(50, z) <= 3.0 < acc.epsilon(50, z * 0.97)
  # the exact (truncated Poisson, PLD) account is never below the untruncated Poisson one
  plain = dp.Accounting(2000, 20, z, 1 / 2000, "shuffle", "pld")
  assert plain.epsilon(50) <= acc.epsilon(50, z) + 1e-3


def test_dp_config_errors_say_what_to_set():
  with pytest.raises(ConfigError, match="dp_l2_clip > 0"):
    dp.check(OptimConfig(dp_epsilon=3.0))
  with pytest.raises(ConfigError, match="not both"):
    dp.check(OptimConfig(dp_l2_clip=1.0, dp_epsilon=3.0, dp_noise_multiplier=1.0))
  with pytest.raises(ConfigError, match="PLD"):
    dp.check(OptimConfig(dp_l2_clip=1.0, dp_accountant="rdp"))


def test_poisson_batches_are_pure_truncated_and_padded():
  n, b = 1000, 40
  keys = np.arange(5 * b, dtype=np.int64)
  idx, real = lm_data.poisson_rows(keys, n, b, seed=0, salt=1)
  again, _ = lm_data.poisson_rows(keys[::-1], n, b, seed=0, salt=1)
  np.testing.assert_array_equal(idx, again[::-1])
  sizes = real.reshape(5, b).sum(1)
  assert sizes.max() <= b and sizes.min() > 15          # mean 40, truncated at 40
  for s in range(5):
    rows = idx[s * b:(s + 1) * b][real[s * b:(s + 1) * b]]
    assert len(set(rows.tolist())) == len(rows)          # no row twice in a batch
  big = lm_data.poisson_rows(np.arange(200 * b, dtype=np.int64), n, b, 0, 1)[1].reshape(200, b)
  assert abs(big.sum(1).mean() - 38.7) < 1.0             # E[min(Poisson(40), 40)] = 38.7


# ----------------------------------------------------------------------------- PII scrubbing

from bigmodel.data import pii, sources  # noqa: E402

SCRUBBED = [
    ("mail john.doe+tag@mail.example.co.uk now", "mail <EMAIL> now"),
    ("card 4111 1111 1111 1111 ok", "card <CARD> ok"),
    ("card 5555-5555-5555-4444.", "card <CARD>."),
    ("amex 378282246310005", "amex <CARD>"),
    ("IBAN GB82 WEST 1234 5698 7654 32 and DE89370400440532013000", "IBAN <IBAN> and <IBAN>"),
    ("from 192.168.0.1, and 8.8.8.8", "from <IP>, and <IP>"),
    ("ipv6 2001:db8::8a2e:370:7334 or fe80::1", "ipv6 <IP> or <IP>"),
    ("call +1 415-555-0132 or (415) 555-0132", "call <PHONE> or <PHONE>"),
    ("or 415.555.0132, +44 20 7946 0958, 020 7946 0958", "or <PHONE>, <PHONE>, <PHONE>"),
    ("db https://bob:s3cret@db.example.com:5432/x done", "db <URL_CREDENTIALS> done"),
    ("bare quad 1.2.3.4 is an address", "bare quad <IP> is an address"),
]
KEPT = [
    "order 1234567812345678 shipped",          # 16 digits, fails Luhn
    "purchase 113542617735902 (passes Luhn, no card brand)",
    "IBAN-like GB82WEST12345698765433",         # mod-97 fails
    "version 1.2.3.4, v1.2.3.4, 1.2.3.4-beta, 1.2.3.4.5",
    "bad address 10.0.0.256 and user@localhost",
    "see https://example.com/a@b and https://example.com/path",
    "on 2024-01-15 at 10:30, total 1,234.56 USD, 4.5 stars",
    "ticket 4587345 and zip 94103",
]


@pytest.mark.parametrize("text,want", SCRUBBED)
def test_scrubber_replaces_typed_placeholders(text, want):
  assert pii.scrub(text, counts := __import__("collections").Counter()) == want
  assert sum(counts.values()) == want.count("<")


@pytest.mark.parametrize("text", KEPT)
def test_scrubber_keeps_near_misses(text):
  assert pii.scrub(text, __import__("collections").Counter()) == text


def test_checksums():
  assert pii.luhn_ok("4111111111111111") and not pii.luhn_ok("1234567812345678")
  assert pii.card_ok("4111111111111111") and not pii.card_ok("113542617735902")
  assert pii.iban_ok("GB82 WEST 1234 5698 7654 32") and not pii.iban_ok("GB82WEST12345698765433")


def test_scrub_pii_stage_on_lm_documents_counts_per_type(tmp_path):
  (tmp_path / "a.txt").write_text("write to a@b.com\n\ncall +1 415-555-0132 or a@b.com\n\nnothing\n")
  cfg = DataConfig(files=[str(tmp_path / "a.txt")], documents="blank_line", scrub_pii=True)
  pii.reset()
  docs, _, _ = sources.lm_documents(cfg)
  assert docs == ["write to <EMAIL>", "call <PHONE> or <EMAIL>", "nothing"]
  report = pii.report("test")
  assert report["EMAIL"] == 2 and report["PHONE"] == 1 and report["CARD"] == 0
  off = sources.lm_documents(DataConfig(files=[str(tmp_path / "a.txt")], documents="blank_line"))
  assert "a@b.com" in off[0][0]
