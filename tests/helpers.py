"""Shared test utilities: tiny experiments and CLI runs."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

TINY_MODEL = [
    "ModelConfig.vocab_size = 64", "ModelConfig.d_model = 32", "ModelConfig.num_layers = 2",
    "ModelConfig.num_heads = 4", "ModelConfig.d_ff = 64", "ModelConfig.max_len = 64",
]


def tiny_bindings(corpus, steps=8, batch=8, seq=16, **extra) -> list[str]:
  b = TINY_MODEL + [
      f"DataConfig.files = ['{corpus}']", "DataConfig.tokenizer = 'byte'",
      "DataConfig.documents = 'blank_line'", f"DataConfig.seq_len = {seq}",
      "DataConfig.eval_batches = 2",
      f"TrainConfig.train_steps = {steps}", f"TrainConfig.batch_size = {batch}",
      "TrainConfig.log_every = 1", "TrainConfig.peak_flops = 1e11",
      "TrainConfig.async_checkpoints = False",
      "ModelConfig.vocab_size = 257", "OptimConfig.warmup_steps = 2",
  ]
  b += [f"{k} = {v!r}" if isinstance(v, str) else f"{k} = {v}" for k, v in extra.items()]
  return b


def tiny_experiment(corpus, **kw):
  from bigmodel import config
  return config.load([], tiny_bindings(corpus, **kw))


def cli(args: list[str], env_extra: dict | None = None, timeout=300, devices=8, check=True):
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)
  if devices:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env.update(env_extra or {})
  proc = subprocess.run([sys.executable, "-m", "bigmodel", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"bigmodel {args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
  return proc


def gin_args(bindings: list[str]) -> list[str]:
  return [f"--gin.{b.replace(' = ', '=')}" for b in bindings]


def train_losses(workdir) -> dict[int, float]:
  """step -> loss of the last record written for that step (a resume rewrites later steps)."""
  losses = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if "split" not in rec:
        losses[rec["step"]] = rec["loss"]
  return losses


def run_main(capsys, *args) -> str:
  """`bigmodel ARGS` in this process (cli.main): its stdout, after asserting exit status 0."""
  from bigmodel import cli
  capsys.readouterr()
  rc = cli.main(list(args))
  out = capsys.readouterr()
  assert rc == 0, f"bigmodel {args} exited {rc}:\n{out.out}\n{out.err}"
  return out.out


def decoder_workdir(work: pathlib.Path, **bindings) -> str:
  """A tiny random-init byte-level GPT run directory, as `bigmodel train` writes one: its
  operative config.gin, tokenizer.json and an orbax checkpoint (step 3) of the TrainState."""
  import gin
  import jax
  from bigmodel import config, sharding
  from bigmodel.data import tokenizers
  from bigmodel.train import checkpoint, loop
  gin.clear_config()
  exp = config.load([], tiny_bindings("unused.txt", steps=4, **bindings))
  comp = loop.Components.build(exp, sharding.make_mesh(exp.mesh))
  state = comp.init_state(jax.random.key(0))
  os.makedirs(work)
  (work / "config.gin").write_text(config.operative_config())
  tokenizers.ByteTokenizer().save(str(work))
  ckpt = checkpoint.Checkpointer(str(work / "checkpoints"), async_save=False)
  ckpt.save(3, state, {"data_step": 3}, force=True)
  ckpt.wait()
  ckpt.close()
  gin.clear_config()
  return str(work)
