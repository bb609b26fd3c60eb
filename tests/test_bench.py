"""bigmodel bench: FLOP counts by hand, grid expansion, the JSON schema on a tiny config
(with the Hugging Face/PyTorch baseline beside it: torch is required, `pip install -e .[bench]`),
the input-pipeline headroom, a profiler trace, and the `bigmodel bench` command."""

from __future__ import annotations

import glob
import json
import os

import pytest

from bigmodel import bench
from tests.helpers import cli, tiny_bindings


def _gpt2_124m_flops(vocab: int, seq: int, causal: bool = False) -> float:
  d, layers, heads = 768, 12, 12
  per_layer = 12 * d * d + 13 * d          # qkv 3d^2+3d, out d^2+d, 2 LayerNorms 4d, MLP 8d^2+5d
  n = vocab * d + layers * per_layer + 2 * d   # tied embedding once, final norm; no positions
  attn = 12 * layers * heads * (d // heads) * seq
  return 6 * n + (attn / 2 if causal else attn)


def _components(bindings):
  from bigmodel import config, sharding
  from bigmodel.config import MeshConfig
  from bigmodel.train.loop import Components
  import jax
  exp = config.load([], bindings)
  return Components.build(exp, sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1]))


def test_flops_gpt2_124m_by_hand():
  comp = _components([
      "ModelConfig.vocab_size = 50257", "ModelConfig.d_model = 768", "ModelConfig.num_layers = 12",
      "ModelConfig.num_heads = 12", "ModelConfig.max_len = 1024", "DataConfig.seq_len = 1024",
      "TrainConfig.train_steps = 10", "TrainConfig.batch_size = 1"])
  palm, causal = comp.flops_per_token(causal=False), comp.flops_per_token(causal=True)
  assert palm == _gpt2_124m_flops(50257, 1024) == 855_166_464      # "about 855M" (DESIGN.md)
  assert causal == _gpt2_124m_flops(50257, 1024, causal=True) == 855_166_464 - 56_623_104
  assert abs(palm / 855e6 - 1) < 0.001


def test_flops_tiny_untied_rmsnorm_by_hand():
  # 2L/4H/32d, d_ff 64, vocab 64, untied head, RMSNorm (scale only), no biases, RoPE, T=16.
  comp = _components([
      "ModelConfig.vocab_size = 64", "ModelConfig.d_model = 32", "ModelConfig.num_layers = 2",
      "ModelConfig.num_heads = 4", "ModelConfig.d_ff = 64", "ModelConfig.tie_embeddings = False",
      "ModelConfig.norm = 'rmsnorm'", "ModelConfig.use_bias = False", "ModelConfig.positions = 'rope'",
      "DataConfig.seq_len = 16", "TrainConfig.train_steps = 10", "TrainConfig.batch_size = 1"])
  d, f, v, layers = 32, 64, 64, 2
  n = 2 * v * d + layers * (4 * d * d + 2 * d * f + 2 * d) + d
  attn = 12 * layers * 4 * 8 * 16
  assert comp.flops_per_token() == 6 * n + attn
  assert comp.flops_per_token(causal=True) == 6 * n + attn / 2


def test_grid_expansion():
  bases = [("nanogpt", ["a.gin"], ["X = 1"]), ("r", ["r.gin"], [])]
  points = bench.expand_grid(bases, sizes=["gpt_nano", "gpt2_small"],
                             meshes=["data=1", "data=2,fsdp=2,tensor=2"], batches=[8, 16],
                             seqs=bench._split_ints(["64"]))
  assert len(points) == 2 * 2 * 2 * 2
  assert len({p.name for p in points}) == len(points)
  first, last = points[0], points[-1]
  assert first.name == "nanogpt/gpt_nano/data1/b8/s64"
  assert first.files == ("a.gin", "experiments/sizes/gpt_nano.gin") and first.bindings == ("X = 1",)
  assert (first.mesh, first.batch, first.seq) == ("data=1", 8, 64)
  assert last.name == "r/gpt2_small/data2xfsdp2xtensor2/b16/s64"
  assert last.files == ("r.gin", "experiments/sizes/gpt2_small.gin")
  # Nothing varies: one point named after its base, the recipe's own batch and seq.
  (only,) = bench.expand_grid([("nanogpt", ["a.gin"], [])])
  assert (only.name, only.mesh, only.batch, only.seq) == ("nanogpt", "", None, None)
  assert bench._split_ints(["4,8", "16"]) == [4, 8, 16] and bench._split_ints(None) == [None]
  assert [bench.mesh_devices(m) for m in ("", "data=2,fsdp=4", "data=-1")] == [0, 8, 0]
  assert bench.parse_steps("3:6") == (3, 6)
  with pytest.raises(Exception):
    bench.parse_steps("6:3")


def test_presets_configure():
  # Every preset parses (gin files exist, macros bound) and gets dropout 0.
  for name, (files, binds) in bench.PRESETS.items():
    exp = bench.configure(bench.Point(name, tuple(files), tuple(binds)))
    assert exp.model.dropout == 0.0 and exp.model.max_len >= exp.data.seq_len
  exp = bench.configure(bench.Point("p", tuple(bench.PRESETS["nanogpt"][0]), (), batch=4, seq=128))
  assert (exp.train.batch_size, exp.data.seq_len, exp.model.max_len) == (4, 128, 256)
  nano = bench.configure(bench.Point("p", tuple(bench.PRESETS["nanogpt"][0])))
  assert (nano.model.num_layers, nano.model.num_heads, nano.model.d_model, nano.data.seq_len,
          nano.train.batch_size, nano.model.vocab_size) == (4, 4, 128, 64, 12, 65)
  gpt2 = bench.configure(bench.Point("p", *map(tuple, bench.PRESETS["gpt2_small"])))
  assert (gpt2.model.num_layers, gpt2.model.d_model, gpt2.data.seq_len, gpt2.train.batch_size,
          gpt2.model.vocab_size) == (12, 768, 256, 4, 50304)
  assert bench.baseline_mismatch(nano) == "" and bench.baseline_mismatch(gpt2) == ""
  assert "float32" in bench.baseline_mismatch(
      bench.configure(bench.Point("p", *map(tuple, bench.PRESETS["gpt2_124m_1024"]))))


def test_random_batch_keys():
  lm = bench.random_batch("causal_lm", 2, 8, 50)
  assert set(lm) == {"inputs", "targets", "positions", "segment_ids", "weights"}
  assert lm["inputs"].shape == (2, 8) and lm["inputs"].max() < 50
  bert = bench.random_batch("bert_mlm_nsp", 2, 16, 50)
  assert bert["masked_lm_positions"].max() < 16 and set(bert["next_sentence_labels"]) <= {0, 1}


@pytest.fixture
def tiny_recipe(tmp_path, text_corpus):
  path = tmp_path / "tiny.gin"
  path.write_text("\n".join(tiny_bindings(text_corpus, steps=10, batch=8, seq=16)) + "\n")
  return path


def test_bench_json_schema_with_baseline(tmp_path, tiny_recipe):
  import torch  # noqa: F401  (required, not skipped: `pip install -e .[bench]`)
  import transformers  # noqa: F401
  out = tmp_path / "bench" / "results.json"
  rc = bench.main(["--recipe", str(tiny_recipe), "--mesh", "data=1", "--mesh", "data=2,fsdp=2,tensor=2",
                   "--warmup", "1", "--steps", "1", "--rounds", "2", "--baseline", "on",
                   "--profile_steps", "1:2", "--out", str(out), "--peak_flops", "1e11"])
  assert rc == 0
  data = json.loads(out.read_text())
  assert data["peak_flops"] == 1e11 and data["peak_source"] == "configured"
  recs = data["records"]
  assert [r["framework"].split()[0] for r in recs] == ["bigmodel", "transformers", "bigmodel"]
  for r in recs:
    for key in bench.REQUIRED_KEYS:
      assert key in r, key
    assert r["tokens_per_sec"] > 0 and r["step_ms"] > 0
    assert r["tokens_per_sec"] == pytest.approx(8 * 16 / (r["step_ms"] / 1e3))
    assert r["mfu_causal"] < r["mfu_palm"]
    assert r["mfu_palm"] == pytest.approx(r["tokens_per_sec"] * r["flops_per_token_palm"] / 1e11)
    assert (r["batch"], r["seq"], r["config"]["layers"], r["config"]["d_model"]) == (8, 16, 2, 32)
  one, base, sharded = recs
  assert one["mesh"] == {"data": 1, "fsdp": 1, "tensor": 1} and one["devices"] == 1
  assert sharded["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and sharded["devices"] == 8
  assert sharded["tokens_per_sec_per_device"] == pytest.approx(sharded["tokens_per_sec"] / 8)
  assert one["memory_bytes_per_device"] > 0 and one["compile_s"] > 0
  assert base["memory_bytes_per_device"] is None and base["compile_s"] is None
  # The baseline is the same model (same parameter count, tied embedding, positions included).
  assert base["params"] == one["params"]
  assert one["ratio_of_median_tokens_per_sec"] == pytest.approx(one["tokens_per_sec"] / base["tokens_per_sec"])
  assert len(one["ratio_vs_baseline_rounds"]) == 2    # paired by round, one step each
  b_ms, j_ms = base["step_ms_all"], one["step_ms_all"]
  assert one["ratio_vs_baseline"] == pytest.approx((b_ms[0] / j_ms[0] + b_ms[1] / j_ms[1]) / 2, rel=1e-2)
  assert "ratio_vs_baseline" not in sharded and "1-device" in sharded["baseline_note"]
  # The tf.data pipeline against what the step consumes.
  assert one["input_tokens_per_sec"] > 0
  assert one["input_headroom"] == pytest.approx(one["input_tokens_per_sec"] / one["tokens_per_sec"])
  # A trace TensorBoard/Perfetto opens.
  assert glob.glob(os.path.join(one["profile_dir"], "**", "*.xplane.pb"), recursive=True)
  md = (tmp_path / "bench" / "results.md").read_text()
  assert "| tiny/data1 | bigmodel |" in md and "vs baseline" in md and "x**" in md


def test_bench_command_fake_devices(tmp_path, tiny_recipe):
  # `bigmodel bench` asks XLA for the devices its largest mesh needs (none are preset here).
  out = tmp_path / "r.json"
  proc = cli(["bench", "--recipe", str(tiny_recipe), "--mesh", "data=2,fsdp=2", "--batch", "4",
              "--seq", "8,16", "--warmup", "1", "--steps", "1", "--rounds", "1", "--baseline", "off",
              "--no_input_pipeline", "--out", str(out), "--gin.ModelConfig.num_layers=1"],
             devices=0, timeout=240)
  assert "4 cpu devices" in proc.stdout and "| tiny/b4/s16 | bigmodel | data2xfsdp2 | 4 x 16 |" in proc.stdout
  recs = json.loads(out.read_text())["records"]
  assert [(r["batch"], r["seq"], r["config"]["layers"]) for r in recs] == [(4, 8, 1), (4, 16, 1)]


def test_bench_bad_point_is_a_usage_error(tmp_path, tiny_recipe, capsys):
  rc = bench.main(["--recipe", str(tiny_recipe), "--mesh", "data=3", "--baseline", "off",
                   "--peak_flops", "1e11", "--out", str(tmp_path / "r.json")])
  assert rc == 2 and "not divisible by the data-parallel size 3" in capsys.readouterr().err


def test_out_paths_and_an_unwritable_out_fail_before_running(tmp_path, tiny_recipe, capsys):
  assert bench.out_paths("a/r.json") == ("a/r.json", "a/r.md")
  assert bench.out_paths("a/run1") == ("a/run1/results.json", "a/run1/results.md")
  (tmp_path / "d.json").mkdir()
  assert bench.out_paths(str(tmp_path / "d.json"))[0] == str(tmp_path / "d.json" / "results.json")
  blocker = tmp_path / "file"
  blocker.write_text("")
  rc = bench.main(["--recipe", str(tiny_recipe), "--baseline", "off", "--peak_flops", "1e11",
                   "--out", str(blocker / "sub")])
  err = capsys.readouterr().err
  assert rc == 2 and "--out" in err and "points" not in capsys.readouterr().out


def test_flops_count_the_vocab_projection_only_where_an_objective_applies_it():
  base = ["ModelConfig.vocab_size = 1000", "ModelConfig.d_model = 32", "ModelConfig.num_layers = 2",
          "ModelConfig.num_heads = 4", "ModelConfig.max_len = 128", "DataConfig.seq_len = 128",
          "TrainConfig.train_steps = 10", "TrainConfig.batch_size = 1"]
  from bigmodel.train import state as state_lib
  v, d, t = 1000, 32, 128
  # BERT: the MLM transform (d*d + d dense, 2d LayerNorm, V output bias) and the V*d output
  # run at the 20 gathered slots of 128, not at every position.
  bert = _components(base + ["TrainConfig.objective = 'bert_mlm_nsp'", "ModelConfig.pre_norm = False"])
  n = state_lib.param_count(bert.abstract.params, exclude=("pos_embed",))
  head = state_lib.param_count(bert.abstract.params["mlm"]) + v * d
  assert state_lib.param_count(bert.abstract.params["mlm"]) == d * d + d + 2 * d + v
  attn = 12 * 2 * 4 * 8 * t
  assert bert.flops_per_token() == pytest.approx(6 * (n - (1 - 20 / t) * head) + attn)
  # a classifier never projects onto the vocabulary: its V*d lookup costs nothing
  cls = _components(base + ["TrainConfig.objective = 'classification'", "ClassificationConfig.num_classes = 3",
                            "ModelConfig.pre_norm = False"])
  n = state_lib.param_count(cls.abstract.params, exclude=("pos_embed",))
  assert cls.flops_per_token() == pytest.approx(6 * (n - v * d) + attn)
