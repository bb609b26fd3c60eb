"""Ahead-of-time compile of the BERT-Base and BERT-Large MLM+NSP train steps on 8 fake devices."""

import pathlib

import pytest

from bigmodel import aot, config
from bigmodel.config import MeshConfig

pytestmark = pytest.mark.slow      # compiles BERT-Large

EXPERIMENTS = pathlib.Path(__file__).resolve().parents[1] / "experiments"


@pytest.mark.parametrize("size,params_m", [("bert_base", 110), ("bert_large", 336)])
def test_aot_compile_with_memory_report(size, params_m):
  exp = config.load(
      [str(EXPERIMENTS / "sizes" / f"{size}.gin"), str(EXPERIMENTS / "runs" / "pretrain_bert.gin")],
      ["TRAIN_STEPS = 1000", "BATCH_SIZE = 32", "SEQ_LEN = 128", "WARMUP_STEPS = 100",
       "LEARNING_RATE = 1e-4"])
  assert exp.train.objective == "bert_mlm_nsp" and not exp.model.pre_norm
  report = aot.compile_train_step(exp, MeshConfig(data=2, fsdp=2, tensor=2))
  print("\n" + size + ": " + aot.format_report(report))
  assert report["devices"] == 8 and report["seq_len"] == 128
  assert abs(report["params"] / 1e6 - params_m) < 0.03 * params_m, report["params"]
  mem = report["memory"]
  # params + AdamW moments, sharded fsdp x tensor = 4 ways, are part of the arguments
  assert mem["argument_size_in_bytes"] > 3 * 4 * report["params"] / 4 * 0.9
  assert mem["total_bytes_per_device"] < 2 ** 30 * (2 if size == "bert_base" else 6)
