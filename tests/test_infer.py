"""KV-cache decoding (bigmodel.infer): cached logits against the full forward, greedy against
the former windowed decoders, batching, top-k / top-p filtering, seeds, the length limit, the
cache's logical axes on a mesh, and `bigmodel chat` on a tiny trained run (serving: test_serve.py)."""

import functools
import io
import json
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec as P

from bigmodel import cli, config, sharding
from bigmodel.config import ConfigError, ModelConfig
from bigmodel.data import tokenizers
from bigmodel.infer import chat, decode, greedy, sample
from bigmodel.models.decoder import Decoder

from tests.helpers import decoder_workdir

# One shape for the generation tests: equal models share the decode loop's compiles.
SMALL = dict(vocab_size=257, d_model=32, num_layers=2, num_heads=4, d_ff=64, max_len=32,
             init_std=0.5)       # a peaked random model: greedy choices are not near ties


@functools.lru_cache(maxsize=None)
def _cached_model(items):
  model = Decoder(ModelConfig(**dict(items)))
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  return model, params


def _model(**kw):
  return _cached_model(tuple(sorted({**SMALL, **kw}.items())))


PROMPTS = [[3], [10, 20, 30, 40, 50], list(range(60, 77)), [250, 1, 2]]   # 17 tokens: 2 buckets
LIMITS = [9, 4, 12, 0]


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("positions", ["learned", "rope"])
@pytest.mark.parametrize("scan", [True, False])
def test_cached_logits_equal_full_forward(positions, scan):
  """Right-padded prefill of rows of different lengths, then one-token steps: every logit
  equals the full forward's at the same position."""
  model, params = _model(positions=positions, scan_layers=scan, remat="full" if scan else "none",
                         init_std=0.02)
  rng = np.random.default_rng(0)
  text = rng.integers(0, 257, (2, 20)).astype(np.int32)
  lengths = np.array([7, 3])
  valid = (np.arange(8)[None] < lengths[:, None]).astype(np.int32)
  block = np.where(valid, text[:, :8], 0)                                     # right-padded
  steps = np.stack([text[r, lengths[r]:lengths[r] + 10] for r in range(2)])  # [2, 10]

  @jax.jit
  def run(params):
    full = model.apply({"params": params}, text)                              # [2, 20, v]
    cache = nn.meta.unbox(decode.init_cache(model, 2, 24))
    first, state = model.apply({"params": params, "cache": cache}, block, segment_ids=valid,
                               decode=True, mutable=["cache"])

    def step(cache, tokens):
      logits, state = model.apply({"params": params, "cache": cache}, tokens[:, None],
                                  decode=True, mutable=["cache"])
      return state["cache"], logits[:, 0]
    cache, rest = jax.lax.scan(step, state["cache"], steps.T)                # [10, 2, v]
    return full, first, rest, state["cache"]["index"], cache["index"]

  full, first, rest, index_after_prefill, index_at_end = jax.device_get(run(params))
  assert list(index_after_prefill) == [7, 3] and list(index_at_end) == [17, 13]
  for r in range(2):
    np.testing.assert_allclose(first[r, :lengths[r]], full[r, :lengths[r]], atol=1e-5, rtol=0)
    np.testing.assert_allclose(rest[:, r], full[r, lengths[r]:lengths[r] + 10], atol=1e-5, rtol=0)


def test_cache_layout_and_logical_axes():
  model = Decoder(ModelConfig(**SMALL))
  boxed = decode.init_cache(model, 4, 32)
  specs = nn.get_partition_spec(boxed)
  kv = ("layers", "act_batch", "act_len", "act_heads", "act_kv")
  assert specs["blocks"]["layers"]["attn"]["cached_key"] == P(*kv)
  assert specs["blocks"]["layers"]["attn"]["cached_value"] == P(*kv)
  assert specs["index"] == P("act_batch")
  shapes = jax.tree.map(lambda a: (a.shape, a.dtype), nn.meta.unbox(boxed))
  assert shapes["blocks"]["layers"]["attn"]["cached_key"] == ((2, 4, 32, 4, 8), jnp.float32)
  bf16 = decode.init_cache(Decoder(ModelConfig(**SMALL, dtype="bfloat16")), 4, 32)
  assert nn.meta.unbox(bf16)["blocks"]["layers"]["attn"]["cached_value"].dtype == jnp.bfloat16
  specs = nn.get_partition_spec(decode.init_cache(Decoder(ModelConfig(**SMALL, scan_layers=False)),
                                                  4, 32))
  assert specs["blocks"]["layer_1"]["attn"]["cached_key"] == P(*kv[1:])
  assert sharding.logical_names(specs) <= sharding.RULE_NAMES


def test_decoding_on_a_mesh_gives_the_same_tokens():
  mesh = sharding.make_mesh(config.MeshConfig(data=2, fsdp=2, tensor=2))
  plain, params = _model()
  want = decode.Generator(plain, params)(PROMPTS, LIMITS)
  got = decode.Generator(Decoder(plain.cfg, mesh), params)(PROMPTS, LIMITS, batch_multiple=4)
  assert got == want and [len(c.tokens) for c in got] == LIMITS


# ----------------------------------------------------------------------------- generation


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_greedy_cached_equals_windowed(positions):
  model, params = _model(positions=positions)
  tok = tokenizers.ByteTokenizer()
  if positions == "learned":        # the text path (`bigmodel sample`) on the same cache
    want = sample.generate_windowed(model, params, tok, "hello there", 18, 32, temperature=0.0)
    assert sample.generate(model, params, tok, "hello there", 18, 32, temperature=0.0) == want
  ids = [tok.encode(p) for p in ["ab", "hello there, how are you", "x", "bcd"]]
  want = greedy.greedy_decode_windowed(model, params, ids, 32, eos_id=None, max_new_tokens=12,
                                       batch_size=4)
  got = greedy.greedy_decode(model, params, ids, 32, eos_id=None, max_new_tokens=12, batch_size=4)
  assert got == want and [len(g) for g in got] == [12, 8, 12, 12]    # the window bounds row 2


def test_batched_prompts_equal_one_at_a_time():
  model, params = _model()
  gen = decode.Generator(model, params)
  prompts, limits = PROMPTS, LIMITS
  alone = [gen([p], m)[0] for p, m in zip(prompts, limits)]
  batched = gen(prompts, limits)
  assert batched == alone
  assert [len(c.tokens) for c in batched] == limits
  # EOS stops one row only: make row 1's third token the EOS
  eos = alone[1].tokens[2]
  res = gen(prompts, limits, eos_id=eos)
  assert res[1].tokens == alone[1].tokens[:2] and res[1].finish == "eos"
  for r in (0, 2):
    cut = alone[r].tokens.index(eos) if eos in alone[r].tokens else limits[r]
    assert res[r].tokens == alone[r].tokens[:cut]


def _kept(logits, top_k, top_p):
  out = decode.filter_logits(jnp.asarray(logits)[None], top_k, top_p)[0]
  return set(np.flatnonzero(np.isfinite(np.asarray(out))).tolist())


def test_top_k_top_p_keep_exactly_the_right_tokens():
  probs = np.array([0.06, 0.4, 0.1, 0.25, 0.04, 0.15])          # ranks: 1, 3, 5, 2, 0, 4
  logits = np.log(probs).astype(np.float32)
  assert _kept(logits, 0, 1.0) == set(range(6))
  assert _kept(logits, 1, 1.0) == {1}
  assert _kept(logits, 2, 1.0) == {1, 3}
  assert _kept(logits, 100, 1.0) == set(range(6))
  assert _kept(logits, 0, 0.3) == {1}                    # 0.4 >= 0.3
  assert _kept(logits, 0, 0.5) == {1, 3}                 # 0.4 < 0.5 <= 0.65
  assert _kept(logits, 0, 0.7) == {1, 3, 5}              # 0.65 < 0.7 <= 0.8
  assert _kept(logits, 0, 0.95) == {0, 1, 2, 3, 5}       # 0.9 < 0.95 <= 0.96
  # combined: top-p over the top-k renormalised (0.4, 0.25, 0.15) / 0.8 = .5, .3125, .1875
  assert _kept(logits, 3, 0.6) == {1, 3}
  assert _kept(logits, 3, 0.85) == {1, 3, 5}
  assert _kept(np.array([1.0, 1.0, 0.0], np.float32), 1, 1.0) == {0, 1}   # a tie stays
  # sampling draws only kept tokens; temperature 0 is argmax
  rows = jnp.asarray(np.repeat(logits[None], 300, 0))
  draws = decode.sample_logits(rows, jax.random.key(0), 1.0, 0, 0.7)
  assert set(np.asarray(draws).tolist()) == {1, 3, 5}
  traced = jax.jit(decode.sample_logits)        # traced settings take the lax.cond branches
  assert set(np.asarray(traced(rows, jax.random.key(0), 1.0, 0, 0.7)).tolist()) == {1, 3, 5}
  assert set(np.asarray(traced(rows, jax.random.key(0), 0.0, 0, 1.0)).tolist()) == {1}


def test_same_seed_same_text():
  model, params = _model()
  gen = decode.Generator(model, params)
  kw = dict(temperature=1.5, top_k=50, top_p=0.95)
  a = gen(PROMPTS, LIMITS, seed=3, **kw)
  assert gen(PROMPTS, LIMITS, seed=3, **kw) == a
  assert gen(PROMPTS, LIMITS, seed=4, **kw) != a
  assert a != gen(PROMPTS, LIMITS)                                   # it did sample
  tok = tokenizers.ByteTokenizer()
  text = sample.generate(model, params, tok, "the", 60, 16, temperature=1.0, seed=5)  # slides
  assert text == sample.generate(model, params, tok, "the", 60, 16, temperature=1.0, seed=5)
  assert len(tok.encode(text)) >= 63 and text.startswith("the")


def test_length_limit():
  model, params = _model()
  gen = decode.Generator(model, params)
  assert len(gen([[1] * 30], 2)[0].tokens) == 2
  with pytest.raises(ConfigError, match=r"30 tokens \+ 3 new tokens = 33 exceeds the 32 "
                                        r"positions .*ModelConfig.max_len.*at most 2"):
    gen([[1] * 30], 3)
  rope, rparams = _model(positions="rope")
  assert len(decode.Generator(rope, rparams)([[1] * 30], 10)[0].tokens) == 10   # no table
  with pytest.raises(ValueError, match="top_p"):
    gen([[1]], 2, temperature=1.0, top_p=0.0)


# ----------------------------------------------------------------------------- chat


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny random-init byte-level GPT run directory, as `bigmodel train` writes one: its
  operative config.gin, tokenizer.json and an orbax checkpoint (step 3) of the TrainState."""
  return decoder_workdir(tmp_path_factory.mktemp("infer") / "run")


def test_chat_through_the_cli(workdir, monkeypatch, capsys):
  monkeypatch.setattr("sys.stdin", io.StringIO("hello there\nthe king\n/reset\n/what\n"
                                               "hello there\n/quit\nnever read\n"))
  capsys.readouterr()
  assert cli.main(["chat", "--workdir", workdir, "--max_new_tokens", "8", "--temperature", "0",
                   "--system", "A chat."]) == 0
  out = capsys.readouterr()
  replies = out.out.splitlines()
  assert len(replies) == 3, out
  assert replies[2] == replies[0]                 # after /reset the history is gone again
  assert "(conversation reset)" in out.err and "unknown command /what" in out.err
  # a template without {prompt} is refused with a message
  monkeypatch.setattr("sys.stdin", io.StringIO("hi\n"))
  assert cli.main(["chat", "--workdir", workdir, "--template", "no placeholder"]) == 2
  assert "{prompt}" in capsys.readouterr().err


def test_conversation_history_and_trimming():
  tok = tokenizers.ByteTokenizer()
  conv = chat.Conversation(tok, chat.PLAIN_TEMPLATE, limit=72, max_new_tokens=16,
                           separator=tok.encode("\n"), system="S")
  ids, dropped, cut = conv.prompt("hi")
  assert tok.decode(ids) == "S\nUser: hi\nAssistant:" and (dropped, cut) == (0, False)
  conv.add("hi", tok.encode(" yo"))
  ids, dropped, _ = conv.prompt("ok")
  assert tok.decode(ids) == "S\nUser: hi\nAssistant: yo\nUser: ok\nAssistant:" and dropped == 0
  conv.add("ok", tok.encode(" fine"))
  ids, dropped, cut = conv.prompt("and now?")           # 75 tokens > 56 of room: drop the oldest
  assert tok.decode(ids) == "S\nUser: ok\nAssistant: fine\nUser: and now?\nAssistant:"
  assert dropped == 1 and not cut and len(ids) == 52
  ids, dropped, cut = conv.prompt("z" * 60)             # alone too long: keeps its end
  assert cut and len(ids) == 56 and tok.decode(ids).endswith("zzz\nAssistant:")
  conv.reset()
  assert tok.decode(conv.prompt("hi")[0]) == "S\nUser: hi\nAssistant:"
  # a reply is cut where the model starts the next user turn
  text, kept = chat.cut_reply(tok, tok.encode(" fine, thanks\nUser: more"), chat.stop_text(chat.PLAIN_TEMPLATE))
  assert text == "fine, thanks" and tok.decode(kept) == " fine, thanks\n"
  # an SFT run's template is used, with EOS between turns
  exp = types.SimpleNamespace(train=types.SimpleNamespace(objective="prompted_lm"),
                              task=types.SimpleNamespace(prompt_template="Q: {prompt}\nA:"))
  assert chat.resolve_template(exp) == ("Q: {prompt}\nA:", True)
  exp.train.objective = "causal_lm"
  assert chat.resolve_template(exp) == (chat.PLAIN_TEMPLATE, False)
