"""Tokenizers that need no download.

* ``"bpe"``: a byte-level BPE (HF ``tokenizers``) trained on the *train split* of the corpus
  with the model's vocab size, cached as ``<cache_dir>/tokenizers/bpe-<hash>.json`` where the
  hash covers the train documents, the vocab size and the training recipe. Training is
  deterministic, so every host that trains it gets the same file.
* ``"byte"``: UTF-8 bytes 0..255 plus an end-of-text id 256 (vocab 257; a larger model vocab
  simply leaves the remaining ids unused).
* ``tokenizer_path``: an existing ``tokenizers`` JSON file.

Every tokenizer has ``encode(str) -> list[int]``, ``decode(ids) -> str``, ``vocab_size``,
``eos_id`` (separates documents in the token stream), ``bos_id`` (None: not used) and
``fingerprint`` (identifies the exact mapping, used to key token caches).
"""
from __future__ import annotations

import abc
import hashlib
import os
from typing import Iterable, Sequence

from jaxlm.data import corpus

EOS_TOKEN = "<|endoftext|>"
_EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
_BPE_RECIPE = "bytelevel-bpe-v1"


class TokenizerError(ValueError):
  pass


class Tokenizer(abc.ABC):
  """Interface shared by the tokenizers below."""
  name: str
  vocab_size: int
  eos_id: int
  bos_id: int | None = None
  fingerprint: str

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Token ids of `text` (no eos/bos added; special-token strings are encoded as text)."""

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  @abc.abstractmethod
  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; eos renders as <|endoftext|>, ids beyond the vocab (model padding) as nothing."""

  def __repr__(self):
    return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes (ids 0..255) and eos = 256."""

  def __init__(self):
    self.name = "byte"
    self.vocab_size = 257
    self.eos_id = 256
    self.bos_id = None
    self.fingerprint = "byte-utf8-eos256-v1"

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Iterable[int]) -> str:
    out, buf = [], bytearray()
    for i in ids:
      i = int(i)
      if 0 <= i < 256:
        buf.append(i)
      elif i == self.eos_id:
        out.append(buf.decode("utf-8", errors="replace"))
        out.append(EOS_TOKEN)
        buf = bytearray()
      # ids above the tokenizer's vocab (model padding) decode to nothing.
    out.append(buf.decode("utf-8", errors="replace"))
    return "".join(out)


class HFTokenizer(Tokenizer):
  """Wraps a `tokenizers.Tokenizer`; special-token strings inside text are encoded as text."""

  def __init__(self, tok, name: str, fingerprint: str, source: str = ""):
    self._tok = tok
    self._tok.encode_special_tokens = True
    self.name = name
    self.fingerprint = fingerprint
    self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
    vocab = tok.get_vocab(with_added_tokens=True)
    eos = next((t for t in _EOS_CANDIDATES if t in vocab), None)
    if eos is None:
      raise TokenizerError(f"tokenizer {source or name} has no end-of-text token "
                           f"(looked for {', '.join(_EOS_CANDIDATES)})")
    self.eos_id = vocab[eos]
    self.bos_id = None

  @property
  def hf(self):
    return self._tok

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Iterable[int]) -> str:
    ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
    return self._tok.decode(ids, skip_special_tokens=False)


def train_bpe(documents: Sequence[str], vocab_size: int):
  """Trains a byte-level BPE with `vocab_size` entries (eos + 256 bytes + merges)."""
  from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tok = HFTok(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=2, show_progress=False,
      special_tokens=[EOS_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(list(documents), trainer=trainer, length=len(documents))
  return tok


def _load_hf(path: str):
  from tokenizers import Tokenizer as HFTok  # pylint: disable=g-import-not-at-top
  return HFTok.from_file(path)


def _train_documents(cfg) -> list[str]:
  docs = corpus.load_documents(cfg)
  train, _ = corpus.split_documents(docs, float(getattr(cfg, "val_fraction", 0.05)))
  return train


def get_tokenizer(cfg, vocab_size: int, *, train_documents: Sequence[str] | None = None) -> Tokenizer:
  """The configured tokenizer, checked against the model's `vocab_size`.

  Args:
    cfg: a DataConfig-like object (tokenizer, tokenizer_path, cache_dir, ...).
    vocab_size: the model's embedding size; the tokenizer's vocab must fit in it.
    train_documents: the train split, if the caller already has it (else loaded from cfg).
  """
  kind = getattr(cfg, "tokenizer", "bpe")
  path = getattr(cfg, "tokenizer_path", "") or ""
  if path:
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
      raise TokenizerError(f"data.tokenizer_path not found: {path}")
    with open(path, "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()
    try:
      hf = _load_hf(path)
    except Exception as e:  # pylint: disable=broad-except
      raise TokenizerError(f"cannot load tokenizer file {path}: {e}") from None
    tok = HFTokenizer(hf, name=f"file:{os.path.basename(path)}", fingerprint="file-" + digest, source=path)
  elif kind == "byte":
    tok = ByteTokenizer()
  elif kind == "bpe":
    if vocab_size < 257:
      raise TokenizerError(f"tokenizer 'bpe' needs a model vocab_size >= 257 (256 byte symbols + eos), "
                           f"got vocab_size={vocab_size}; use a larger vocab or data.tokenizer=byte")
    docs = list(train_documents) if train_documents is not None else _train_documents(cfg)
    key = hashlib.sha256(f"{_BPE_RECIPE}|{vocab_size}|{corpus.documents_fingerprint(docs)}".encode()).hexdigest()
    cache_path = os.path.join(corpus.default_cache_dir(cfg), "tokenizers", f"bpe-{key[:24]}.json")
    if os.path.exists(cache_path):
      hf = _load_hf(cache_path)
    else:
      hf = train_bpe(docs, vocab_size)
      corpus.atomic_write_bytes(cache_path, hf.to_str().encode("utf-8"))
    tok = HFTokenizer(hf, name=f"bpe{vocab_size}", fingerprint=f"bpe-{key[:24]}", source=cache_path)
    tok.cache_path = cache_path
  else:
    raise TokenizerError(f"unknown data.tokenizer {kind!r} (expected 'bpe' or 'byte', or set data.tokenizer_path)")
  if tok.vocab_size > vocab_size:
    raise TokenizerError(f"tokenizer {tok.name} has vocab size {tok.vocab_size}, larger than the model's "
                         f"vocab_size={vocab_size}; raise model.vocab_size to at least {tok.vocab_size}")
  return tok
