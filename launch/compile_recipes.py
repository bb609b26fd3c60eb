"""Every recipe in experiments/ compiled for a Cloud TPU slice: `bigmodel compile --topology`.

    JAX_PLATFORMS=cpu PYTHONPATH=$PWD nice -n 10 .venv/bin/python launch/compile_recipes.py \\
        --topology v5p-128 --out /tmp/recipes.jsonl [--only sst2_fast,backprop] [--mesh fsdp=64]
        [--skip_eval]

Each recipe goes through `bigmodel compile --topology T --gin_file=RECIPE` (the CLI's entry
point, in this one process: the command a user types, alone: no size, data file or checkpoint
given), one after the other;
its last output line (the report's JSON) is appended to the JSONL file as it finishes (a re-run
skips the recipes already there), and the markdown table is printed at the end: the mesh (the
recipe's own MeshConfig over the slice's chips unless --mesh), the global batch (rounded up to a
multiple of the data-parallel ways when the recipe's does not divide, "from N"), per-chip HBM of
the train and eval steps, whether both fit, and the compile seconds (CPU host, as measured).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import json
import os
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)     # this checkout's bigmodel, not an installed one


def recipes() -> list[str]:
  """experiments/**.gin but the runs/ and sizes/ parts they include, as paths from the root."""
  found = glob.glob(os.path.join(ROOT, "experiments", "**", "*.gin"), recursive=True)
  return sorted(os.path.relpath(p, ROOT) for p in found
                if os.path.basename(os.path.dirname(p)) not in ("runs", "sizes"))


def name_of(recipe: str) -> str:
  return os.path.relpath(recipe, "experiments")[:-len(".gin")]


def compile_one(recipe: str, topology: str, mesh: str, skip_eval: bool) -> dict:
  """`bigmodel compile --topology T --gin_file=RECIPE` through the CLI's own entry point, in this
  process (one jax and libtpu start for the whole sweep); its JSON line, or {error}."""
  from bigmodel import cli
  argv = ["compile", "--topology", topology, f"--gin_file={recipe}"]
  argv += ["--mesh", mesh] if mesh else []
  argv += ["--skip_eval"] if skip_eval else []
  out, err = io.StringIO(), io.StringIO()
  t = time.perf_counter()
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      rc = cli.main(argv)
  except Exception as e:    # noqa: BLE001 - one recipe's failure is a row of the table
    rc, err = None, io.StringIO(f"{type(e).__name__}: {e}")
  row = {"recipe": name_of(recipe), "rc": rc, "wall_s": time.perf_counter() - t}
  lines = out.getvalue().strip().splitlines()
  if rc in (0, 3) and lines and lines[-1].startswith("{"):
    return {**row, **json.loads(lines[-1])}
  tail = [line for line in (err.getvalue() + out.getvalue()).strip().splitlines() if "Warning" not in line]
  return {**row, "error": " | ".join(tail[-3:])[-600:]}


def table(rows: list[dict]) -> str:
  from bigmodel import pod
  gib = lambda b: "-" if b is None else f"{b / 2**30:.3f}"
  params = lambda n: f"{n / 1e6:,.2f}M" if n >= 1e4 else f"{n:,}"
  out = ["| recipe | params | mesh | global batch | seq | train GiB/chip | eval GiB/chip | fits | "
         "compile s (train + eval) |", "|" + "---|" * 9]
  for r in rows:
    if "error" in r:
      out.append(f"| {r['recipe']} | FAILED (rc {r['rc']}): {r['error'][:200]} |" + " |" * 7)
      continue
    mesh, compile_s = pod.table_cells(r)
    batch = f"{r['batch']}" + (f" (from {r['batch_adjusted_from']})" if "batch_adjusted_from" in r else "")
    out.append(f"| {r['recipe']} | {params(r['params'])} | {mesh} | {batch} | {r['seq_len']} | "
               f"{gib(r['bytes_per_device'])} | {gib(r['eval_bytes_per_device'])} | "
               f"{'yes' if r['fits'] else 'no'} | {compile_s} |")
  return "\n".join(out)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--topology", default="v5p-128")
  p.add_argument("--out", default="compile_recipes.jsonl")
  p.add_argument("--only", default="", help="comma-separated recipe names, e.g. finetune/sst2_fast")
  p.add_argument("--mesh", default="", help="one mesh for every recipe (default: each recipe's own)")
  p.add_argument("--skip_eval", action="store_true", help="compile the train step only")
  args = p.parse_args(argv)
  os.chdir(ROOT)             # the recipes' includes are found from the checkout's root
  only = set(filter(None, args.only.split(",")))
  todo = [r for r in recipes() if not only or name_of(r) in only or os.path.basename(name_of(r)) in only]
  done = []
  if os.path.exists(args.out):
    with open(args.out) as f:
      last = {r["recipe"]: r for r in map(json.loads, filter(str.strip, f))}   # a re-run's row wins
    done = list(last.values())
  have = {r["recipe"] for r in done if "error" not in r and r.get("topology") == args.topology}
  for recipe in todo:
    if name_of(recipe) in have:
      continue
    load = open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else "?"
    r = {**compile_one(recipe, args.topology, args.mesh, args.skip_eval), "load_before": load}
    done = [d for d in done if d["recipe"] != r["recipe"]] + [r]
    with open(args.out, "a") as f:
      f.write(json.dumps(r) + "\n")
    status = r.get("error") or f"fits={r['fits']}"
    print(f"{r['recipe']}: {r['wall_s']:.0f}s wall (load {load}): {status}", file=sys.stderr, flush=True)
  names = {name_of(r) for r in todo}
  print(table(sorted((d for d in done if d["recipe"] in names), key=lambda d: d["recipe"])))
  return 0 if all("error" not in d for d in done if d["recipe"] in names) else 1


if __name__ == "__main__":
  sys.exit(main())
