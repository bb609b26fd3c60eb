"""Command line: `bigmodel {train,finetune,eval,evaluate,predict,sample,chat,serve,compile,tokenizer,convert,bench} ...`
(also `python -m bigmodel`).

    bigmodel train --gin_file=experiments/gpt_shakespeare_char.gin [--gin.NAME=VALUE ...] --workdir=DIR
    bigmodel eval --workdir=DIR
    bigmodel sample --workdir=DIR --prompt "ROMEO:" --num_tokens 200 --temperature 0.8 --top_k 40 [--top_p 0.95]
    bigmodel chat --workdir=DIR [--system TEXT] [--template 'User: {prompt}\nAssistant:']   (stdin: one turn a line)
    bigmodel serve --workdir=DIR --port 8000 [--host 127.0.0.1] [--slots 8] [--api_key K]   (OpenAI API)
    bigmodel compile --gin_file=... --mesh data=2,fsdp=2,tensor=2
    bigmodel compile --gin_file=... --topology v5p-128 [--mesh fsdp=64] [--find_max_batch] [--train_tokens 1e10]
    bigmodel tokenizer train --input FILES --vocab_size N --model_type {unigram,bpe,char} --out PREFIX
    bigmodel data prepare --gin_file=... --out DIR_OR_URL [--workers N]   (then DataConfig.prepared_dir)
    bigmodel finetune --gin_file=experiments/finetune/sst2_minilm.gin --workdir=DIR
    bigmodel evaluate --workdir=DIR [--eval_file F] [--out metrics.json]
    bigmodel predict --workdir=DIR --input F --out predictions.jsonl
    bigmodel convert from-hf --model_dir HF_DIR --out WORKDIR [--allow_pickle]
    bigmodel convert to-hf --checkpoint WORKDIR --out HF_DIR
    bigmodel bench [--preset ...] [--recipe X.gin --size S --mesh M --batch B --seq T ...]

jax is imported only after the arguments are read, so that `compile` can ask for
fake CPU devices first.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys

EXIT_USAGE = 2


def _gin_args(sp, workdir_required=True):
  sp.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
  sp.add_argument("--workdir", required=workdir_required, help="run directory")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="bigmodel", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = p.add_subparsers(dest="command", required=True)
  for add in (_add_run_commands, _add_decode_commands, _add_serve_command, _add_compile_command,
              _add_data_commands, _add_model_commands):
    add(sub)
  sub.add_parser("bench", help="benchmark grid: tokens/s, MFU, memory, the HF baseline beside "
                 "(its flags: `bigmodel bench --help`; main() hands them to bigmodel.bench)")
  return p


def _add_run_commands(sub):
  """train, finetune, evaluate, predict, eval."""
  t = sub.add_parser("train", help="train or resume a model")
  _gin_args(t)
  ft = sub.add_parser("finetune", help="fine-tune on a task (train with a recipe from "
                      "experiments/finetune/; TrainConfig.init_checkpoint names the start)")
  _gin_args(ft)
  for sp in (t, ft):
    sp.add_argument("--allow_changed", default="", metavar="FIELD[,FIELD]",
                    help="on resume, accept these changed run fields (batch_size, seq_len, seed, "
                    "data_seed, data, vocab_size); the log says what happens to the data position")
  ev = sub.add_parser("evaluate", help="a fine-tuned run's task metrics -> JSON (accuracy and macro-F1, "
                      "entity F1, SQuAD EM/F1, perplexity, BLEU)")
  _gin_args(ev)
  ev.add_argument("--eval_file", default="", help="default: the run's DataConfig.val_files[0]")
  ev.add_argument("--out", default="", help="metrics JSON (default: WORKDIR/eval_metrics.json)")
  pr = sub.add_parser("predict", help="predictions of a fine-tuned run for an input file -> JSONL")
  _gin_args(pr)
  pr.add_argument("--input", required=True, help="the task's input file: TSV/CSV/JSONL text "
                  "column(s), CoNLL or plain text, SQuAD JSON, prompts, or source sentences")
  pr.add_argument("--out", required=True, help="predictions, one JSON object a line")
  e = sub.add_parser("eval", help="validation loss and perplexity of a run's latest checkpoint")
  _gin_args(e)


def _add_decode_commands(sub):
  """sample, chat."""
  s = sub.add_parser("sample", help="generate text from a run's latest checkpoint")
  _gin_args(s)
  s.add_argument("--prompt", default="")
  s.add_argument("--num_tokens", type=int, default=200)
  s.add_argument("--temperature", type=float, default=0.8)
  s.add_argument("--top_k", type=int, default=0)
  s.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling (1: off)")
  s.add_argument("--seed", type=int, default=0)
  ch = sub.add_parser("chat", help="talk to a run's decoder: one user turn a line of stdin "
                      "(/reset, /quit); the history stays in the prompt")
  _gin_args(ch)
  ch.add_argument("--system", default="", help="text put before the conversation")
  ch.add_argument("--template", default="", help="a user turn, with {prompt} (default: the run's "
                  "PromptedConfig.prompt_template for a prompted-LM run, else 'User: {prompt}\nAssistant:')")
  ch.add_argument("--max_new_tokens", type=int, default=128)
  ch.add_argument("--temperature", type=float, default=0.7)
  ch.add_argument("--top_k", type=int, default=0)
  ch.add_argument("--top_p", type=float, default=0.95)
  ch.add_argument("--seed", type=int, default=0)


def _add_serve_command(sub):
  """serve."""
  sv = sub.add_parser("serve", help="serve a run's decoder: an OpenAI-compatible HTTP API "
                      "(/v1/completions, /v1/chat/completions, streaming) with continuous batching")
  _gin_args(sv)
  sv.add_argument("--port", type=int, default=8000)
  sv.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to listen on every interface")
  sv.add_argument("--slots", type=int, default=8, help="requests decoded together")
  sv.add_argument("--max_len", type=int, default=0, help="prompt + reply tokens a request may "
                  "hold (0: ModelConfig.max_len); the cache holds slots x max_len")
  sv.add_argument("--max_queue", type=int, default=64, help="requests waiting for a slot "
                  "before 503")
  sv.add_argument("--prefix_cache_mb", type=float, default=256.0, help="keys/values of past "
                  "conversations kept for the next turn (LRU)")
  sv.add_argument("--template", default="", help="chat template with {prompt} (default: the run's)")
  sv.add_argument("--model_name", default="", help="the model id in /v1 (default: the workdir's name)")
  sv.add_argument("--api_key", default="", help="require 'Authorization: Bearer KEY' on every "
                  "route (default: $BIGMODEL_API_KEY; none: open)")
  sv.add_argument("--max_batch", type=int, default=8, help="the most prompts in one /generate")


def _add_compile_command(sub):
  """compile (fake CPU devices or a TPU slice)."""
  c = sub.add_parser("compile", help="ahead-of-time compile the train step for a mesh (fake CPU "
                     "devices), or the train and eval steps for a Cloud TPU slice (--topology)")
  _gin_args(c, workdir_required=False)
  c.add_argument("--mesh", default="", help="e.g. data=2,fsdp=2,tensor=2 (default: the config's)")
  c.add_argument("--devices", type=int, default=0, help="fake CPU devices (default: mesh size or 8)")
  _compile_topology_args(c)


def _add_data_commands(sub):
  """tokenizer, data."""
  tok = sub.add_parser("tokenizer", help="tokenizer tools")
  tsub = tok.add_subparsers(dest="tok_command", required=True)
  tt = tsub.add_parser("train", help="train a SentencePiece model")
  tt.add_argument("--input", nargs="+", required=True, help="text files")
  tt.add_argument("--vocab_size", type=int, required=True)
  tt.add_argument("--model_type", choices=("unigram", "bpe", "char"), default="unigram")
  tt.add_argument("--out", default="tokenizer", help="output prefix (writes PREFIX.model, PREFIX.vocab)")
  tt.add_argument("--special_tokens", nargs="*", default=[],
                  help="reserved symbols, e.g. [CLS] [SEP] [MASK]")
  dt = sub.add_parser("data", help="data tools")
  dp = dt.add_subparsers(dest="data_command", required=True).add_parser(
      "prepare", help="tokenize a recipe's DataConfig.files once into token shards (local or "
      "gs://...) that training streams with DataConfig.prepared_dir")
  dp.add_argument("--gin_file", action="append", default=[], help="gin file (repeatable)")
  dp.add_argument("--out", required=True, help="the directory or URL to write")
  dp.add_argument("--workers", type=int, default=0, help="processes (default: one per CPU)")
  dp.add_argument("--chunk_mb", type=float, default=64.0, help="large files are cut into "
                  "pieces of about this size, at document boundaries, one per task")


def _add_model_commands(sub):
  """convert, lora, quantize."""
  cv = sub.add_parser("convert", help="import/export Hugging Face checkpoints (BERT, GPT-2)")
  cvsub = cv.add_subparsers(dest="convert_command", required=True)
  cf = cvsub.add_parser("from-hf", help="HF directory -> bigmodel workdir (checkpoint, config.gin, tokenizer)")
  cf.add_argument("--model_dir", required=True, help="config.json + model.safetensors (+ vocab files)")
  cf.add_argument("--out", required=True, help="the workdir to write")
  cf.add_argument("--allow_pickle", action="store_true",
                  help="also read pytorch_model.bin (a pickle: only from a trusted source)")
  ct = cvsub.add_parser("to-hf", help="bigmodel workdir -> HF directory (config.json, model.safetensors)")
  ct.add_argument("--checkpoint", required=True, help="a workdir (config.gin + checkpoints/)")
  ct.add_argument("--out", required=True, help="the directory to write")
  lo = sub.add_parser("lora", help="LoRA runs: export the adapters, or merge them into a plain workdir")
  losub = lo.add_subparsers(dest="lora_command", required=True)
  le = losub.add_parser("export", help="a LoRA run's adapters -> OUT/adapters.safetensors + lora.json")
  le.add_argument("--workdir", required=True, help="a run trained with ModelConfig.lora_rank > 0")
  le.add_argument("--out", required=True, help="the directory to write")
  lm = losub.add_parser("merge", help="a LoRA run (or a base run + --adapters) -> a plain workdir "
                        "with merged weights, for sample/chat/serve/evaluate/to-hf")
  lm.add_argument("--workdir", required=True, help="a LoRA run, or with --adapters its base run")
  lm.add_argument("--adapters", default="", help="a `bigmodel lora export` directory to merge "
                  "into --workdir")
  lm.add_argument("--out", required=True, help="the workdir to write")
  q = sub.add_parser("quantize", help="int8 copy of a trained or imported workdir (qwix PTQ), "
                     "read by evaluate, predict, eval, sample, chat and serve")
  _gin_args(q)
  q.add_argument("--out", required=True, help="the quantized workdir to write")
  q.add_argument("--mode", default="dynamic", choices=["weight_only", "dynamic"],
                 help="weight_only: int8 weights, float activations; dynamic (default): int8 "
                 "weights and per-token int8 activations")


def _compile_topology_args(c):
  g = c.add_argument_group("TPU slice (needs libtpu: pip install -e '.[tpu]'); exit 0 fits, 3 does not")
  g.add_argument("--topology", default="", help="compile for this Cloud TPU slice on this host: "
                 "v5e-N / v6e-N count chips (v5e-16: 16 chips); v4-N / v5p-N count TensorCores, "
                 "2 per chip (v5p-128: 64 chips), as Google names them")
  g.add_argument("--find_max_batch", action="store_true",
                 help="also search the largest global batch whose train step fits (by compiling)")
  g.add_argument("--max_compiles", type=int, default=4, help="compile budget of that search")
  g.add_argument("--skip_eval", action="store_true", help="compile only the train step")
  g.add_argument("--mfu", type=float, default=0.5, help="ASSUMED model FLOPs utilization for the "
                 "step-time and cost estimate (default 0.5)")
  g.add_argument("--train_tokens", type=float, default=0, help="estimate chip-hours and wall hours "
                 "to train on this many tokens")
  g.add_argument("--chip_hour_usd", type=float, default=0, help="price of a chip-hour, for cost_usd")
  g.add_argument("--headroom", type=float, default=0.05, help="fraction of HBM kept free for the "
                 "runtime when judging fits (default 0.05)")
  g.add_argument("--largest_buffers", type=int, default=0,
                 help="list the N largest HBM allocations of the train step (XLA's memory report)")


def _split_gin_bindings(argv: list[str]) -> tuple[list[str], list[str]]:
  """Pulls `--gin.NAME=VALUE` out of argv (argparse cannot express that family)."""
  rest, bindings = [], []
  for arg in argv:
    if arg.startswith("--gin."):
      body = arg[len("--gin."):]
      if "=" not in body:
        raise SystemExit(f"bigmodel: error: {arg}: expected --gin.NAME=VALUE")
      bindings.append(body)
    else:
      rest.append(arg)
  return rest, bindings


def _setup_logging():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
  for noisy in ("absl", "orbax", "jax", "tensorflow", "etils"):
    logging.getLogger(noisy).setLevel(logging.WARNING)
  try:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.WARNING)
  except ImportError:
    pass


def _load_config(args, bindings, defaults=None):
  from bigmodel import config
  from bigmodel import storage
  from bigmodel.data import recsys  # noqa: F401 - registers RecsysConfig with gin
  files = list(args.gin_file)
  if not files and getattr(args, "workdir", None):
    saved = storage.join(args.workdir, "config.gin")
    if storage.is_remote(saved) and storage.exists(saved):
      bindings = [storage.read_text(saved), *bindings]   # gin reads only local files
    elif os.path.exists(saved):
      files = [saved]          # a run's own operative config: resume, eval, sample
    elif not bindings:
      raise config.ConfigError(f"{saved} does not exist: pass --gin_file, or a --workdir "
                               f"written by `bigmodel train`")
  exp = config.load(files, bindings, defaults=defaults)
  recsys.operative(exp)     # a recommender's RecsysConfig joins the run's config.gin
  return exp


def cmd_train(args, bindings):
  from bigmodel import config
  from bigmodel.infer.train_hooks import SampleAtEnd
  from bigmodel.train import loop, preemption
  exp = _load_config(args, bindings)
  allow = [f for f in args.allow_changed.split(",") if f]
  summary = loop.train(exp, args.workdir, config.operative_config(), hooks=[SampleAtEnd()],
                       allow_changed=allow)
  if summary.get("preempted"):   # a checkpoint is saved: a requeue resumes from it
    print(f"preempted: checkpoint at step {summary['step']} in {args.workdir}; exit status "
          f"{preemption.EXIT_PREEMPTED} (requeue to resume)", flush=True)
    return preemption.EXIT_PREEMPTED
  _print_summary(summary)


def _print_summary(summary: dict):
  import jax
  if jax.process_index() != 0:
    return
  if "sample" in summary:
    print("\n--- sample ---\n" + summary["sample"] + "\n--------------")
  tps = summary.get("tokens_per_sec")
  mfu = summary.get("mfu")
  print(f"final: step {summary['step']} | validation loss {summary['validation_loss']:.4f} | "
        f"{tps or 0:,.0f} tokens/s | MFU {'n/a' if mfu is None else f'{mfu:.1%}'} of "
        f"{summary['peak_flops'] / 1e9:.1f} "
        f"GFLOP/s ({summary['peak_flops_source']}) | wall {summary['wall_time_s']:.1f}s "
        f"(training {summary['train_time_s']:.1f}s)", flush=True)


def cmd_evaluate(args, bindings):
  from bigmodel.evaluation import tasks
  exp = _load_config(args, bindings)
  result = tasks.evaluate(args.workdir, exp, args.eval_file)
  from bigmodel import storage
  tasks.write_json(result, args.out or storage.join(args.workdir, "eval_metrics.json"))
  print(json.dumps(result, indent=1))


def cmd_predict(args, bindings):
  from bigmodel.evaluation import tasks
  exp = _load_config(args, bindings)
  rows = tasks.predict(args.workdir, exp, args.input)
  tasks.write_jsonl(rows, args.out)
  print(f"wrote {len(rows)} predictions to {args.out}")


def cmd_eval(args, bindings):
  from bigmodel.train import loop
  exp = _load_config(args, bindings)
  result = loop.eval_checkpoint(args.workdir, exp)
  print(json.dumps(result, indent=1))


def _restore_decoder(args, bindings):
  """(experiment, model, params, tokenizer, step) of a run whose model generates text; without
  the training input pipelines, so that TensorFlow is never imported (bigmodel.infer.restore)."""
  from bigmodel.infer import restore
  exp = _load_config(args, bindings)
  model, params, tokenizer, step = restore.restore_decoder(args.workdir, exp, args.command)
  return exp, model, params, tokenizer, step


def _compile_cache():
  """sample, chat and serve keep their compiled XLA programs on disk, so that the next start
  skips most compiling: for the rest of this process, jax's persistent compilation cache in
  $BIGMODEL_COMPILE_CACHE (default ~/.cache/bigmodel/xla; empty: off; an explicit
  $JAX_COMPILATION_CACHE_DIR wins)."""
  path = os.environ.get("BIGMODEL_COMPILE_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "bigmodel", "xla"))
  if not path or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  import jax
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _check_sampling(args):
  from bigmodel.config import ConfigError
  from bigmodel.infer import decode
  try:
    decode.check_sampling(args.temperature, args.top_k, args.top_p)
  except ValueError as e:
    raise ConfigError(f"--{e}") from None


def cmd_sample(args, bindings):
  from bigmodel.infer import sample
  _check_sampling(args)
  _compile_cache()
  exp, model, params, tokenizer, _ = _restore_decoder(args, bindings)
  text = sample.generate(model, params, tokenizer, args.prompt, args.num_tokens,
                         exp.data.seq_len, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, seed=args.seed)
  print(text)


def cmd_chat(args, bindings):
  from bigmodel.config import ConfigError
  from bigmodel.infer import chat, decode
  _check_sampling(args)
  _compile_cache()
  exp, model, params, tokenizer, _ = _restore_decoder(args, bindings)
  try:
    template, sft = chat.resolve_template(exp, args.template)
    eos = getattr(tokenizer, "eos_id", None)
    sep = [eos] if sft and eos is not None else list(tokenizer.encode("\n"))
    conv = chat.Conversation(tokenizer, template, model.cfg.max_len, args.max_new_tokens,
                             sep, args.system)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  gen = decode.Generator(model, params, bucket=64)
  chat.run(gen, tokenizer, conv, temperature=args.temperature, top_k=args.top_k,
           top_p=args.top_p, seed=args.seed)


def cmd_serve(args, bindings):
  from bigmodel.infer import api, serve
  _compile_cache()
  if _load_config(args, bindings).train.objective in ("sasrec", "bert4rec"):
    return _serve_recommender(args, bindings)
  exp, model, params, tokenizer, step = _restore_decoder(args, bindings)
  name = args.model_name or os.path.basename(os.path.normpath(args.workdir))
  app, engine = serve.build_app(exp, model, params, tokenizer, step=step, slots=args.slots,
                                max_len=args.max_len, max_queue=args.max_queue,
                                prefix_cache_mb=args.prefix_cache_mb, template=args.template,
                                model_name=name, max_batch=args.max_batch, api_key=args.api_key)
  print(f"bigmodel serve: {name} on http://{args.host}:{args.port} ({engine.slots} slots, "
        f"max_len {engine.max_len}; POST /v1/completions, /v1/chat/completions, /generate; "
        f"GET /v1/models, /health)", flush=True)
  api.run(app, args.host, args.port)
  engine.stop()


def _serve_recommender(args, bindings):
  """`bigmodel serve` on a recommender run: POST /recommend (bigmodel.infer.recommend)."""
  from bigmodel.evaluation.recsys import Recommender
  from bigmodel.infer import api, recommend
  rec = Recommender(args.workdir, _load_config(args, bindings))
  name = args.model_name or os.path.basename(os.path.normpath(args.workdir))
  app = recommend.make_app(rec, max_batch=args.max_batch, model_name=name,
                           api_key=args.api_key or os.environ.get("BIGMODEL_API_KEY") or None)
  print(f"bigmodel serve: {name} on http://{args.host}:{args.port} ({len(rec.vocab)} items; "
        f"POST /recommend, GET /health)", flush=True)
  api.run(app, args.host, args.port)


def cmd_compile(args, bindings):
  from bigmodel import aot, config
  exp = _load_config(args, bindings, defaults=aot.UNREAD_BY_COMPILE)
  mesh_cfg = config.parse_mesh(args.mesh) if args.mesh else exp.mesh
  if not args.topology:
    print(aot.format_report(aot.compile_train_step(exp, mesh_cfg)))
    return 0
  from bigmodel import pod
  estimate = pod.Estimate(args.mfu, args.train_tokens, args.chip_hour_usd)
  pod.check_estimate(estimate)
  if not 0 <= args.headroom < 1:
    raise config.ConfigError(f"--headroom {args.headroom}: expected a fraction in [0, 1)")
  r = pod.report(exp, args.topology, mesh_cfg, estimate=estimate, headroom=args.headroom,
                 max_batch=args.find_max_batch, largest=args.largest_buffers,
                 max_compiles=args.max_compiles, skip_eval=args.skip_eval)
  print(pod.format_report(r))
  print(json.dumps(pod.json_summary(r)), flush=True)
  return 0 if r["fits"] else pod.EXIT_DOES_NOT_FIT


def cmd_tokenizer(args, bindings):
  from bigmodel.data import tokenizers
  path = tokenizers.train_sentencepiece(args.input, args.vocab_size, args.model_type, args.out,
                                        special_tokens=args.special_tokens)
  tok = tokenizers.SentencePieceTokenizer(path)
  print(f"wrote {path} ({tok.vocab_size} pieces)")


def cmd_data(args, bindings):
  from bigmodel.data import prepare
  exp = _load_config(args, bindings)
  summary = prepare.prepare(exp.data, args.out, workers=args.workers, chunk_mb=args.chunk_mb)
  print(json.dumps(summary, indent=1))
  print(f"prepared {summary['tokens']:,} tokens into {summary['train_rows']:,} train and "
        f"{summary['val_rows']:,} validation rows at {summary['tokens_per_sec']:,.0f} tokens/s; "
        f"train with --gin.DataConfig.prepared_dir=\"'{args.out}'\"")


def cmd_convert(args, bindings):
  from bigmodel.config import ConfigError
  from bigmodel.data.hf_tokenizers import TokenizerFilesError
  from bigmodel.interop import workdir
  from bigmodel.interop.hf import HFCheckpointError
  from bigmodel.pretrained import PretrainedError
  try:
    if args.convert_command == "from-hf":
      result = workdir.from_hf(args.model_dir, args.out, allow_pickle=args.allow_pickle)
    else:
      result = workdir.to_hf(args.checkpoint, args.out)
  except (HFCheckpointError, PretrainedError, TokenizerFilesError) as e:
    raise ConfigError(str(e)) from None
  print(json.dumps(result, indent=1))


def cmd_lora(args, bindings):
  from bigmodel.interop import lora_workdir
  if args.lora_command == "export":
    result = lora_workdir.export(args.workdir, args.out)
  else:
    result = lora_workdir.merge(args.workdir, args.out, args.adapters)
  print(json.dumps(result, indent=1))


def cmd_quantize(args, bindings):
  from bigmodel import quant
  exp = _load_config(args, bindings)
  print(json.dumps(quant.quantize(args.workdir, args.out, exp, args.mode), indent=1))


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "sample": cmd_sample, "chat": cmd_chat,
            "serve": cmd_serve, "compile": cmd_compile,
            "tokenizer": cmd_tokenizer, "convert": cmd_convert, "data": cmd_data, "finetune": cmd_train,
            "evaluate": cmd_evaluate, "predict": cmd_predict, "lora": cmd_lora}
COMMANDS["quantize"] = cmd_quantize


def _fake_devices_for_compile(argv: list[str], args) -> None:
  """`compile` runs on fake CPU devices: ask XLA for enough before jax is imported."""
  if args.command != "compile" or "jax" in sys.modules:
    return
  os.environ.setdefault("JAX_PLATFORMS", "cpu")   # --topology: the TPU devices come from libtpu
  if args.topology:
    return
  n = args.devices
  if not n and args.mesh:
    sizes = [int(part.split("=")[1]) for part in args.mesh.split(",") if "=" in part]
    n = math.prod(s for s in sizes if s > 0) if sizes else 8
  n = n or 8
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main(argv: list[str] | None = None) -> int:
  from bigmodel import hostmem
  if not os.environ.get("JAX_PLATFORMS") and hostmem.cpu_host():
    # No accelerator on this host: jax would still try every installed plugin (libtpu, from
    # the tpu/test extras, prints errors when it finds no TPU). Every bigmodel command runs on
    # CPU here; `compile --topology` loads libtpu for its topology all the same.
    os.environ["JAX_PLATFORMS"] = "cpu"
  hostmem.keep_freed_memory()    # CPU hosts, before jax and tf.data allocate (BIGMODEL_MALLOC=system: off)
  argv = list(sys.argv[1:] if argv is None else argv)
  rest, bindings = _split_gin_bindings(argv)
  if rest[:1] == ["bench"]:   # its own flags; it asks for fake devices before jax loads
    if "--loop" in rest:      # the training loop against its own step (bigmodel/train/loop_bench.py)
      from bigmodel.train import loop_bench
      return loop_bench.main(rest[1:] + [f"--gin.{b}" for b in bindings])
    from bigmodel import bench
    return bench.main(rest[1:] + [f"--gin.{b}" for b in bindings])
  args = _parser().parse_args(rest)
  _fake_devices_for_compile(rest, args)
  _setup_logging()
  from bigmodel import storage
  storage.configure()    # the object-store settings its libraries read (bigmodel/storage.py)
  from bigmodel.config import ConfigError
  from bigmodel.data.sources import DataError
  from bigmodel.train.checkpoint import CheckpointError
  try:
    code = COMMANDS[args.command](args, bindings)   # None: success
  except Exception as e:  # noqa: BLE001 - usage errors get a message, the rest its traceback
    loop = sys.modules.get("bigmodel.train.loop")   # not imported by sample/chat/serve (no TF)
    usage = (ConfigError, DataError, CheckpointError, FileNotFoundError)
    if not isinstance(e, usage) and not (loop and isinstance(e, loop.TrainingError)):
      raise
    print(f"bigmodel {args.command}: error: {e}", file=sys.stderr, flush=True)
    return EXIT_USAGE
  return code or 0


if __name__ == "__main__":
  sys.exit(main())
