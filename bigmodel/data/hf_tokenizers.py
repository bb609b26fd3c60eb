"""Tokenizers of imported Hugging Face models: BERT WordPiece, GPT-2 byte-level BPE, and any
`tokenizer.json` (Llama, Mistral, Qwen2: byte-level BPE or SentencePiece-style BPE).

Both are built with the maintained `tokenizers` library (the Rust code behind the
transformers "fast" tokenizers) from the plain vocabulary files of a checkpoint:

  WordPieceTokenizer  vocab.txt (+ tokenizer_config.json: do_lower_case, strip_accents,
                      tokenize_chinese_chars, special tokens). Basic tokenization
                      (BertNormalizer: clean text, CJK splitting, lower-casing and accent
                      stripping for uncased models; BertPreTokenizer), greedy WordPiece,
                      [CLS] A [SEP] (B [SEP]) templates with segment ids.
  ByteLevelBPETokenizer  vocab.json + merges.txt (GPT-2's byte-level BPE, <|endoftext|>).
  TokenizerJson       tokenizer.json as the library saved it (normalizer, pre-tokenizer, model,
                      BOS template and decoder all inside: Llama 3's byte-level BPE, Llama 2 /
                      Mistral's SentencePiece BPE with byte fallback, Qwen2's BPE), special
                      tokens (bos, eos, pad, unk) from tokenizer_config.json. A checkpoint with
                      only a SentencePiece tokenizer.model and no tokenizer.json is not read.

They expose the interface of `bigmodel.data.tokenizers` (vocab_size, eos_id, encode,
encode_array, decode, save), so the tf.data pipelines use them as they use
SentencePiece, plus what BERT-style data and inference need: `piece_to_id`, the special
ids (cls_id, sep_id, pad_id, mask_id, unk_id), `encode(..., add_special_tokens=True)`,
`encode_pair` and `batch` (padded numpy arrays for `model.apply`).

Special tokens in text: `encode`, `encode_pair` and `batch` behave as transformers'
tokenizers do (a literal "[SEP]" or "<|endoftext|>" in the text becomes that token's id),
which parity with Hugging Face needs (`bigmodel.load_pretrained(...).tokenizer`, prompts).
Training and evaluation data go through `encode_ordinary` (or `split_special_tokens=True`,
transformers' name for it; nanoGPT's `encode_ordinary`): raw text cannot inject a control
token, and the pipelines insert [CLS], [SEP], [MASK] and EOS by id where they belong.

`save(directory)` writes files that both `bigmodel.data.tokenizers.load` and
`transformers.AutoTokenizer.from_pretrained` read: the vocabulary file(s),
tokenizer_config.json, special_tokens_map.json and the library's tokenizer.json.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors

from bigmodel import storage

WORDPIECE_FILES = ("vocab.txt",)
BPE_FILES = ("vocab.json", "merges.txt")
JSON_FILE = "tokenizer.json"
GPT2_CLASSES = ("GPT2Tokenizer", "GPT2TokenizerFast")


class TokenizerFilesError(ValueError):
  """The tokenizer files of a checkpoint are missing or inconsistent."""


def _read_json(path: str) -> dict:
  if not storage.exists(path):
    return {}
  return storage.read_json(path)


def _token_str(value) -> str | None:
  """Special tokens are strings, or dicts {"content": ...} in newer tokenizer_config files."""
  if isinstance(value, dict):
    return value.get("content")
  return value


def _special(directory: str, name: str, default: str | None) -> str | None:
  for fname in ("tokenizer_config.json", "special_tokens_map.json"):
    cfg = _read_json(storage.join(directory, fname))
    if name in cfg and cfg[name] is not None:
      return _token_str(cfg[name])
  return default


class _HFTokenizer:
  """Shared behaviour over a `tokenizers.Tokenizer`."""
  kind = ""
  eos_id: int | None = None

  def __init__(self, tok: tokenizers.Tokenizer, specials: dict[str, str | None]):
    self.tok = tok
    self.specials = {k: v for k, v in specials.items() if v is not None}
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

  def piece_to_id(self, piece: str) -> int:
    i = self.tok.token_to_id(piece)
    if i is None:
      raise KeyError(f"{piece!r} is not in the {self.kind} vocabulary")
    return i

  def id_to_piece(self, i: int) -> str | None:
    return self.tok.id_to_token(int(i))

  def _special_id(self, name: str) -> int | None:
    piece = self.specials.get(name)
    return None if piece is None else self.tok.token_to_id(piece)

  @property
  def unk_id(self) -> int | None:
    return self._special_id("unk_token")

  @property
  def pad_id(self) -> int | None:
    return self._special_id("pad_token")

  def library_tokenizer(self, split_special_tokens: bool = False) -> tokenizers.Tokenizer:
    """The library tokenizer; with split_special_tokens, a copy that reads a literal special
    token in the text ("[SEP]", "<|endoftext|>") as ordinary text."""
    if not split_special_tokens:
      return self.tok
    if getattr(self, "_ordinary", None) is None:
      self._ordinary = tokenizers.Tokenizer.from_str(self.tok.to_str())
      self._ordinary.encode_special_tokens = True
    return self._ordinary

  def encode(self, text: str, add_special_tokens: bool = False,
             split_special_tokens: bool = False) -> list[int]:
    """Token ids of `text`; without special tokens unless asked (pipelines add their own).

    As transformers' tokenizers do, a literal special token in `text` becomes its id unless
    `split_special_tokens` (then it is ordinary text: `encode_ordinary`)."""
    tok = self.library_tokenizer(split_special_tokens)
    return tok.encode(text, add_special_tokens=add_special_tokens).ids

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self.encode(text), np.int32)

  def encode_ordinary(self, text: str) -> list[int]:
    """Token ids of raw text: special tokens written in it are ordinary text (training data)."""
    return self.encode(text, split_special_tokens=True)

  def encode_ordinary_array(self, text: str) -> np.ndarray:
    return np.asarray(self.encode_ordinary(text), np.int32)

  def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False,
                   split_special_tokens: bool = False) -> list[list[int]]:
    return [e.ids for e in self.library_tokenizer(split_special_tokens).encode_batch(
        list(texts), add_special_tokens=add_special_tokens)]

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def batch(self, texts: Sequence[str], pairs: Sequence[str] | None = None, *,
            max_len: int | None = None, add_special_tokens: bool = True,
            pad_to: int | None = None, split_special_tokens: bool = False) -> dict[str, np.ndarray]:
    """Right-padded numpy arrays input_ids, attention_mask, token_type_ids [b, s].

    Sequences longer than `max_len` are truncated (pairs: the longest first); `pad_to`
    pads to a fixed length (default: the longest sequence). A literal special token in a
    text becomes its id, as in transformers, unless `split_special_tokens` (training data).
    """
    if isinstance(texts, str):
      raise TypeError("batch() takes a list of texts; use encode() for one text")
    inputs = list(texts) if pairs is None else list(zip(texts, pairs))
    tok = self.library_tokenizer(split_special_tokens)
    if max_len:
      tok.enable_truncation(max_len)
    else:
      tok.no_truncation()
    try:
      encs = tok.encode_batch(inputs, add_special_tokens=add_special_tokens)
    finally:
      tok.no_truncation()
    length = max([len(e.ids) for e in encs] + [1])
    if pad_to:
      if pad_to < length:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest sequence ({length} tokens); "
                         f"set max_len to truncate")
      length = pad_to
    pad = self.pad_id if self.pad_id is not None else 0
    out = {"input_ids": np.full((len(encs), length), pad, np.int32),
           "attention_mask": np.zeros((len(encs), length), np.int32),
           "token_type_ids": np.zeros((len(encs), length), np.int32)}
    for i, e in enumerate(encs):
      n = len(e.ids)
      out["input_ids"][i, :n] = e.ids
      out["attention_mask"][i, :n] = 1
      out["token_type_ids"][i, :n] = e.type_ids
    return out

  def _save_common(self, directory: str, config: dict) -> None:
    storage.makedirs(directory)
    storage.write_json(storage.join(directory, "tokenizer_config.json"), config)
    storage.write_json(storage.join(directory, "special_tokens_map.json"), self.specials)
    storage.write_text(storage.join(directory, "tokenizer.json"), self.tok.to_str(pretty=True))


class WordPieceTokenizer(_HFTokenizer):
  """BERT's tokenizer from a `vocab.txt` (uncased models lower-case and strip accents)."""
  kind = "wordpiece"

  def __init__(self, vocab_file: str, *, do_lower_case: bool = True,
               strip_accents: bool | None = None, tokenize_chinese_chars: bool = True,
               unk_token: str = "[UNK]", sep_token: str = "[SEP]", pad_token: str = "[PAD]",
               cls_token: str = "[CLS]", mask_token: str = "[MASK]",
               max_input_chars_per_word: int = 100):
    if not storage.exists(vocab_file):
      raise TokenizerFilesError(f"WordPiece vocabulary {vocab_file!r} does not exist")
    with storage.local_file(vocab_file) as local:
      vocab = models.WordPiece.read_file(local)
    for name, piece in (("unk_token", unk_token), ("sep_token", sep_token),
                        ("cls_token", cls_token), ("pad_token", pad_token)):
      if piece not in vocab:
        raise TokenizerFilesError(f"{vocab_file}: the {name} {piece!r} is not in the vocabulary")
    tok = tokenizers.Tokenizer(models.WordPiece(vocab, unk_token=unk_token, continuing_subword_prefix="##",
                                                max_input_chars_per_word=max_input_chars_per_word))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=tokenize_chinese_chars, strip_accents=strip_accents,
        lowercase=do_lower_case)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    cls_id, sep_id = vocab[cls_token], vocab[sep_token]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls_token}:0 $A:0 {sep_token}:0",
        pair=f"{cls_token}:0 $A:0 {sep_token}:0 $B:1 {sep_token}:1",
        special_tokens=[(cls_token, cls_id), (sep_token, sep_id)])
    specials = {"unk_token": unk_token, "sep_token": sep_token, "pad_token": pad_token,
                "cls_token": cls_token, "mask_token": mask_token if mask_token in vocab else None}
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in (pad_token, unk_token, cls_token, sep_token, mask_token)
                            if t in vocab])
    super().__init__(tok, specials)
    self.vocab_file = vocab_file
    self.options = {"do_lower_case": do_lower_case, "strip_accents": strip_accents,
                    "tokenize_chinese_chars": tokenize_chinese_chars}
    # [SEP] ends every BERT segment: it plays EOS for pipelines that append one.
    self.eos_id = sep_id

  @classmethod
  def from_directory(cls, directory: str) -> "WordPieceTokenizer":
    cfg = _read_json(storage.join(directory, "tokenizer_config.json"))
    kw = {name: _special(directory, name, default) for name, default in
          (("unk_token", "[UNK]"), ("sep_token", "[SEP]"), ("pad_token", "[PAD]"),
           ("cls_token", "[CLS]"), ("mask_token", "[MASK]"))}
    return cls(storage.join(directory, "vocab.txt"),
               do_lower_case=bool(cfg.get("do_lower_case", True)),
               strip_accents=cfg.get("strip_accents"),
               tokenize_chinese_chars=bool(cfg.get("tokenize_chinese_chars", True)), **kw)

  @property
  def cls_id(self) -> int:
    return self._special_id("cls_token")

  @property
  def sep_id(self) -> int:
    return self._special_id("sep_token")

  @property
  def mask_id(self) -> int | None:
    return self._special_id("mask_token")

  def encode_pair(self, text: str, pair: str | None = None) -> tuple[list[int], list[int]]:
    """([CLS] A [SEP] (B [SEP]) ids, segment ids)."""
    e = self.tok.encode(text, pair, add_special_tokens=True)
    return e.ids, e.type_ids

  def save(self, directory: str) -> str:
    path = storage.join(directory, "vocab.txt")
    vocab = self.tok.get_vocab(with_added_tokens=False)
    pieces = [None] * len(vocab)
    for piece, i in vocab.items():
      pieces[i] = piece
    storage.write_text(path, "".join(p + "\n" for p in pieces))
    self._save_common(directory, {
        "tokenizer_class": "BertTokenizer", **self.options, **self.specials,
        "model_max_length": 512})
    return path


class ByteLevelBPETokenizer(_HFTokenizer):
  """GPT-2's byte-level BPE from `vocab.json` + `merges.txt`; EOS is <|endoftext|>."""
  kind = "bpe"

  def __init__(self, vocab_file: str, merges_file: str, *, eos_token: str = "<|endoftext|>",
               add_prefix_space: bool = False):
    for path in (vocab_file, merges_file):
      if not storage.exists(path):
        raise TokenizerFilesError(f"byte-level BPE file {path!r} does not exist")
    with storage.local_file(vocab_file) as v, storage.local_file(merges_file) as m:
      vocab, merges = models.BPE.read_file(v, m)
    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, continuing_subword_prefix="",
                                          end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    if eos_token in vocab:
      tok.add_special_tokens([AddedToken(eos_token, special=True, normalized=False)])
    super().__init__(tok, {"eos_token": eos_token if eos_token in vocab else None,
                           "bos_token": eos_token if eos_token in vocab else None,
                           "unk_token": eos_token if eos_token in vocab else None})
    self.vocab_file, self.merges_file = vocab_file, merges_file
    self.add_prefix_space = add_prefix_space
    self.eos_id = vocab.get(eos_token)

  @classmethod
  def from_directory(cls, directory: str) -> "ByteLevelBPETokenizer":
    cfg = _read_json(storage.join(directory, "tokenizer_config.json"))
    return cls(storage.join(directory, "vocab.json"), storage.join(directory, "merges.txt"),
               eos_token=_special(directory, "eos_token", "<|endoftext|>"),
               add_prefix_space=bool(cfg.get("add_prefix_space", False)))

  def save(self, directory: str) -> str:
    # The BPE model writes vocab.json and merges.txt in the reference format (to a local
    # folder: on an object store, a temporary one that is then copied up).
    if storage.is_remote(directory):
      import tempfile
      with tempfile.TemporaryDirectory() as tmp:
        for name in self.tok.model.save(tmp):
          storage.copy(name, storage.join(directory, os.path.basename(name)))
    else:
      storage.makedirs(directory)
      self.tok.model.save(directory)
    self._save_common(directory, {
        "tokenizer_class": "GPT2Tokenizer", "add_prefix_space": self.add_prefix_space,
        **self.specials, "model_max_length": 1024})
    return storage.join(directory, "vocab.json")


class TokenizerJson(_HFTokenizer):
  """The tokenizer a `tokenizer.json` describes, whole (see the module docstring)."""
  kind = "json"

  def __init__(self, path: str, specials: dict[str, str | None], config: dict | None = None):
    if not storage.exists(path):
      raise TokenizerFilesError(f"tokenizer file {path!r} does not exist")
    try:
      tok = tokenizers.Tokenizer.from_str(storage.read_text(path))
    except Exception as e:   # the library raises its own exception type on a bad file
      raise TokenizerFilesError(f"{path} is not a tokenizer.json the `tokenizers` library "
                                f"reads: {e}") from None
    for name, piece in specials.items():
      if piece is not None and tok.token_to_id(piece) is None:
        raise TokenizerFilesError(f"{path}: the {name} {piece!r} of tokenizer_config.json is "
                                  f"not in the vocabulary")
    super().__init__(tok, specials)
    self.config = dict(config or {})
    self.eos_id = self._special_id("eos_token")

  @property
  def bos_id(self) -> int | None:
    return self._special_id("bos_token")

  @classmethod
  def from_directory(cls, directory: str) -> "TokenizerJson":
    cfg = _read_json(storage.join(directory, "tokenizer_config.json"))
    specials = {name: _special(directory, name, None)
                for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return cls(storage.join(directory, JSON_FILE), specials, cfg)

  def save(self, directory: str) -> str:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **self.config, **self.specials}
    self._save_common(directory, config)
    return storage.join(directory, JSON_FILE)


def _kind(directory: str) -> str | None:
  """wordpiece (vocab.txt), bpe (GPT-2's vocab.json + merges.txt), json (tokenizer.json: also
  when a vocab.json + merges.txt belong to a non-GPT-2 tokenizer, as Qwen2's), or None."""
  has = lambda f: storage.exists(storage.join(directory, f))
  if all(map(has, WORDPIECE_FILES)):
    return "wordpiece"
  cls = _read_json(storage.join(directory, "tokenizer_config.json")).get("tokenizer_class")
  if all(map(has, BPE_FILES)) and (not has(JSON_FILE) or cls in (None, *GPT2_CLASSES)):
    return "bpe"
  return "json" if has(JSON_FILE) else None


def has_files(directory: str) -> bool:
  """Whether `directory` holds WordPiece, byte-level BPE or tokenizer.json files."""
  return _kind(directory) is not None


def load(directory: str, kind: str | None = None):
  """The tokenizer whose files are in `directory`: `kind` 'wordpiece', 'bpe' or 'json', else
  detected."""
  if kind is None:
    kind = _kind(directory)
    if kind is None:
      raise TokenizerFilesError(
          f"no tokenizer files in {directory!r}: expected vocab.txt (BERT WordPiece), "
          f"vocab.json + merges.txt (GPT-2 byte-level BPE) or tokenizer.json")
  if kind == "wordpiece":
    return WordPieceTokenizer.from_directory(directory)
  if kind == "bpe":
    return ByteLevelBPETokenizer.from_directory(directory)
  if kind == "json":
    return TokenizerJson.from_directory(directory)
  raise ValueError(f"unknown tokenizer kind {kind!r}: expected 'wordpiece', 'bpe' or 'json'")
