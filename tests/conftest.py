"""Tests run on CPU with 8 fake devices; the flag must be set before jax is imported."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("BIGMODEL_COMPILE_CACHE", "")   # the CLI's own on-disk cache: off (below instead)

# One persistent XLA compilation cache for the whole session, in a temporary folder that the
# first process (the xdist controller, or a lone pytest) makes and removes at exit; xdist workers
# and the CLI processes that tests start inherit it. Most tests compile the same tiny programs
# again in a new process or a new `train()` (whose jitted step is a new function), and XLA:CPU
# compiling was 80% of a tiny training run. The eviction size turns on jax's file lock, so that
# concurrent processes never read a half-written entry.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  _XLA_CACHE = tempfile.mkdtemp(prefix="bigmodel-tests-xla-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

import pathlib  # noqa: E402

import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(os.environ.get("BIGMODEL_DATA_DIR") or ROOT.parent / "shared" / "data")


@pytest.fixture
def shared_data():
  if not (SHARED_DATA / "tinyshakespeare" / "input.txt").exists():
    pytest.skip(f"shared datasets not found at {SHARED_DATA}")
  return SHARED_DATA


@pytest.fixture
def text_corpus(tmp_path):
  """A small generated corpus: documents separated by blank lines."""
  import random
  rng = random.Random(0)
  words = "the king queen lord lady sword crown castle night day love war peace".split()
  docs = []
  for _ in range(60):
    sents = [" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) + "." for _ in range(rng.randint(2, 6))]
    docs.append(" ".join(sents))
  path = tmp_path / "corpus.txt"
  path.write_text("\n\n".join(docs) + "\n")
  return path


@pytest.fixture(autouse=True)
def _fresh_gin():
  """Config dataclasses are gin configurables: bindings left by one test must not fill
  defaults in the next."""
  import gin
  gin.clear_config()
  yield
  gin.clear_config()


# End-to-end tests (training runs, CLI processes, servers, big AOT compiles) in files that do
# not mark themselves: `make test-fast` deselects every `slow` test, `make test` runs them all.
# A file name maps to the tests it marks (None: the whole file).
_SLOW_TESTS = {
    "test_bert_e2e.py": None,
    "test_train.py": ("test_exact_resume_and_determinism", "test_resume_after_kill_9_during_async_save",
                      "test_cli_end_to_end", "test_multiprocess_matches_single_process_preempts_and_samples"),
    "test_bench.py": ("test_bench_json_schema_with_baseline", "test_bench_command_fake_devices"),
    "test_infer.py": ("test_server", "test_chat_through_the_cli"),
    "test_shards.py": ("test_cli_prepare_then_train", "test_gs_prepare_and_stream_on_the_emulator"),
    "test_aot_and_tools.py": ("test_every_recipe_compiles_ahead_of_time",),
    "test_storage.py": None,
    "test_resume.py": None,
    "test_serve.py": None,
    "test_loop.py": ("test_bad_steps_in_a_row_stop_the_run_with_finite_checkpoints",),
}


# The longest tests (over a minute each in `make test PYTEST_ARGS="-n 2 --durations=40"`): their
# files start first, then the other files with `slow` tests, then the rest, so that the two xdist
# workers fill the end of the run with short tests instead of one worker running a long one
# alone. Whole files move, in order, so that module fixtures are still set up once a worker.
_LONGEST_FIRST = (
    "test_multiprocess_matches_single_process_preempts_and_samples",
    "test_resume_after_kill_9_during_async_save",
    "test_classifier_quantize_evaluate_predict_and_distill_cli",
    "test_aggregate_and_plots_on_two_tiny_real_runs",
    "test_sft_cli_from_pretrained_gpt",
    "test_finetune_evaluate_predict_cli",
    "test_pretrain_then_phase2_from_checkpoint",
    "test_gpt2_workdir_samples_evaluates_trains_and_exports",
    "test_bench_json_schema_with_baseline",
    "test_training_moves_only_the_adapters",
    "test_cli_end_to_end",
    "test_recipe_compiles_for_v5e_and_v5p",
)


def _order(item) -> int:
  name = getattr(item, "originalname", item.name)
  if name in _LONGEST_FIRST:
    return _LONGEST_FIRST.index(name)
  return len(_LONGEST_FIRST) + (0 if item.get_closest_marker("slow") else 1)


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if item.path.name not in _SLOW_TESTS:
      continue
    names = _SLOW_TESTS[item.path.name]
    if names is None or getattr(item, "originalname", item.name) in names:
      item.add_marker(pytest.mark.slow)
  rank: dict = {}
  for item in items:
    rank[item.path] = min(rank.get(item.path, len(_LONGEST_FIRST) + 2), _order(item))
  items.sort(key=lambda item: rank[item.path])      # stable: collection order within a file
