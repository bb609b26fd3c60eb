"""Tokenizers: character, byte and SentencePiece, behind one small interface.

A run saves its tokenizer into the workdir (`tokenizer.json` or `tokenizer.model`)
so that eval and sample read exactly what training used.

Special tokens and raw text: training and evaluation text is encoded with
`encode_ordinary` (as nanoGPT's `enc.encode_ordinary`), so that a literal "[MASK]", "[SEP]"
or "<|endoftext|>" in a corpus is ordinary text, never the control id; the pipelines put
[CLS], [SEP], [MASK] and EOS in by id. SentencePiece models trained here reserve their
special pieces as control symbols, which SentencePiece never matches in text; a model with
them as user-defined symbols (trained before) has them split out of the text by
`encode_ordinary`. `encode` keeps each library's own behaviour (for imported Hugging Face
tokenizers, transformers' behaviour: see `hf_tokenizers`), for prompts and parity.
"""

from __future__ import annotations

import io
import os
import re
from typing import Protocol, Sequence

import numpy as np

from bigmodel import storage


class Tokenizer(Protocol):
  vocab_size: int
  eos_id: int | None

  def encode(self, text: str) -> list[int]: ...
  def decode(self, ids: Sequence[int]) -> str: ...
  def save(self, directory: str) -> str: ...


class CharTokenizer:
  """One id per character seen in the training text (nanoGPT's Shakespeare setup).

  No EOS: a character corpus is one stream.
  """
  eos_id = None

  def __init__(self, chars: Sequence[str]):
    self.chars = list(chars)
    self.index = {c: i for i, c in enumerate(self.chars)}
    self.vocab_size = len(self.chars)

  @classmethod
  def fit(cls, texts: Sequence[str]) -> "CharTokenizer":
    return cls(sorted(set().union(*map(set, texts))))

  def encode(self, text: str) -> list[int]:
    try:
      return [self.index[c] for c in text]
    except KeyError as e:
      raise ValueError(f"character {e.args[0]!r} is not in the character vocabulary "
                       f"({self.vocab_size} characters seen in training)") from None

  def encode_array(self, text: str) -> np.ndarray:
    lut = np.full(max(map(ord, self.chars)) + 1, -1, np.int32)
    lut[[ord(c) for c in self.chars]] = np.arange(self.vocab_size, dtype=np.int32)
    codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
    if codes.size and codes.max() >= lut.size or (lut[codes] < 0).any():
      self.encode(text)  # raises with the offending character
    return lut[codes]

  def decode(self, ids: Sequence[int]) -> str:
    return "".join(self.chars[i] for i in ids if 0 <= i < self.vocab_size)

  encode_ordinary = encode            # no special tokens: every id is a character
  encode_ordinary_array = encode_array

  def save(self, directory: str) -> str:
    path = storage.join(directory, "tokenizer.json")
    storage.write_json(path, {"type": "char", "chars": self.chars}, indent=None)
    return path


class ByteTokenizer:
  """UTF-8 bytes 0..255, plus EOS = 256."""
  vocab_size = 257
  eos_id = 256

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def encode_array(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids: Sequence[int]) -> str:
    return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

  encode_ordinary = encode            # EOS (256) is no byte: text cannot produce it
  encode_ordinary_array = encode_array

  def save(self, directory: str) -> str:
    path = storage.join(directory, "tokenizer.json")
    storage.write_json(path, {"type": "byte"}, indent=None)
    return path


class SentencePieceTokenizer:
  def __init__(self, model_path: str):
    import sentencepiece as spm
    if not storage.exists(model_path):
      raise FileNotFoundError(f"SentencePiece model {model_path!r} does not exist; train one with "
                              f"`bigmodel tokenizer train --input FILES --vocab_size N --out PREFIX`")
    self.path = model_path
    self.sp = spm.SentencePieceProcessor(model_proto=storage.read_bytes(model_path))
    self.vocab_size = self.sp.get_piece_size()
    eos = self.sp.eos_id()
    self.eos_id = eos if eos >= 0 else None

  def encode(self, text: str) -> list[int]:
    return self.sp.encode(text)

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self.sp.encode(text), np.int32)

  def user_defined_pieces(self) -> tuple[str, ...]:
    """Pieces SentencePiece matches literally in text (user-defined symbols)."""
    if not hasattr(self, "_user_defined"):
      from sentencepiece import sentencepiece_model_pb2
      proto = sentencepiece_model_pb2.ModelProto()
      proto.ParseFromString(self.sp.serialized_model_proto())
      user = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
      self._user_defined = tuple(sorted((p.piece for p in proto.pieces if p.type == user),
                                        key=len, reverse=True))
    return self._user_defined

  def encode_ordinary(self, text: str) -> list[int]:
    """Ids of raw text in which no user-defined piece (a [MASK] reserved that way) is matched:
    the text around each literal occurrence is encoded as usual and the literal itself
    character by character (each character's piece, or <unk>)."""
    specials = [p for p in self.user_defined_pieces() if p in text]
    if not specials:
      return self.sp.encode(text)
    ids: list[int] = []
    pos = 0
    for m in re.finditer("|".join(map(re.escape, specials)), text):
      ids += self.sp.encode(text[pos:m.start()])
      ids += [self.sp.piece_to_id(c) for c in m.group()]
      pos = m.end()
    return ids + self.sp.encode(text[pos:])

  def encode_ordinary_array(self, text: str) -> np.ndarray:
    return np.asarray(self.encode_ordinary(text), np.int32)

  def piece_to_id(self, piece: str) -> int:
    return self.sp.piece_to_id(piece)

  def decode(self, ids: Sequence[int]) -> str:
    return self.sp.decode([int(i) for i in ids])

  def save(self, directory: str) -> str:
    path = storage.join(directory, "tokenizer.model")
    if storage.absolute(path) != storage.absolute(self.path):
      storage.write_bytes(path, self.sp.serialized_model_proto())
    return path


def encode_ordinary(tokenizer, text: str) -> np.ndarray:
  """int32 ids of raw training/evaluation text, special tokens in it read as ordinary text
  (any tokenizer: those without `encode_ordinary_array` have no special tokens to match)."""
  fn = getattr(tokenizer, "encode_ordinary_array", None) or tokenizer.encode_array
  return np.asarray(fn(text), np.int32)


def build(spec: str, texts: Sequence[str] | None = None):
  """`char` (fit on texts), `byte`, a path to a SentencePiece `.model`, or a directory with
  an imported model's vocab.txt (WordPiece) or vocab.json + merges.txt (byte-level BPE)."""
  if spec == "char":
    if not texts:
      raise ValueError("a char tokenizer needs training text to fit its vocabulary")
    return CharTokenizer.fit(texts)
  if spec == "byte":
    return ByteTokenizer()
  if storage.isdir(spec):   # an imported model's WordPiece / byte-level BPE files
    from bigmodel.data import hf_tokenizers
    return hf_tokenizers.load(spec)
  return SentencePieceTokenizer(spec)


def load(directory: str):
  """The tokenizer a run saved into its workdir."""
  sp_path = storage.join(directory, "tokenizer.model")
  if storage.exists(sp_path):
    return SentencePieceTokenizer(sp_path)
  if any(storage.exists(storage.join(directory, f)) for f in ("vocab.txt", "merges.txt")):
    from bigmodel.data import hf_tokenizers   # an imported model's WordPiece / byte-level BPE
    return hf_tokenizers.load(directory)
  path = storage.join(directory, "tokenizer.json")
  if not storage.exists(path):
    raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {directory!r}: "
                            f"is it the workdir of a `bigmodel train` run?")
  spec = storage.read_json(path)
  if "model" in spec:       # the `tokenizers` library's own file: an imported Llama-family tokenizer
    from bigmodel.data import hf_tokenizers
    return hf_tokenizers.load(directory, "json")
  if spec["type"] == "char":
    return CharTokenizer(spec["chars"])
  if spec["type"] == "byte":
    return ByteTokenizer()
  if spec["type"] == "items":    # a recommender run's item catalogue (bigmodel.data.recsys)
    from bigmodel.data.recsys import ItemVocab
    return ItemVocab(spec["items"])
  raise ValueError(f"{path}: unknown tokenizer type {spec['type']!r}")


def train_sentencepiece(inputs: Sequence[str], vocab_size: int, model_type: str, out_prefix: str,
                        special_tokens: Sequence[str] = (), character_coverage: float = 1.0,
                        max_sentence_length: int = 16384) -> str:
  """Trains a SentencePiece model on text files; returns the `.model` path.

  `special_tokens` are reserved as control symbols (e.g. [CLS] [SEP] [MASK]): their ids are
  put in by the pipelines, and the same text in a corpus stays ordinary text.
  ids: 0 <pad>, 1 <unk>, 2 <s>, 3 </s> (eos), then the special tokens.
  """
  import sentencepiece as spm
  if model_type not in ("unigram", "bpe", "char", "word"):
    raise ValueError(f"--model_type {model_type!r}: expected unigram, bpe or char")
  missing = [p for p in inputs if not storage.exists(p)]
  if missing:
    raise FileNotFoundError(f"tokenizer input files do not exist: {missing}")
  options = dict(vocab_size=vocab_size, model_type=model_type,
                 character_coverage=character_coverage, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                 control_symbols=",".join(special_tokens) if special_tokens else "",
                 max_sentence_length=max_sentence_length, minloglevel=2,
                 train_extremely_large_corpus=False, hard_vocab_limit=model_type != "char")
  if not any(storage.is_remote(p) for p in [*inputs, out_prefix]):
    storage.makedirs(os.path.dirname(os.path.abspath(out_prefix)))
    spm.SentencePieceTrainer.train(input=",".join(inputs), model_prefix=out_prefix, **options)
    return out_prefix + ".model"
  # Object storage: lines streamed in, the model (and its .vocab listing) written out.
  def lines():
    for path in inputs:
      with storage.open(path, "r", encoding="utf-8") as f:
        for line in f:
          yield line.rstrip("\n")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=lines(), model_writer=model, **options)
  sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
  storage.write_bytes(out_prefix + ".model", model.getvalue())
  storage.write_text(out_prefix + ".vocab", "".join(
      f"{sp.id_to_piece(i)}\t{sp.get_score(i):g}\n" for i in range(sp.get_piece_size())))
  return out_prefix + ".model"
