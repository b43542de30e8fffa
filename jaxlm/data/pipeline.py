"""Deterministic, resumable, per-host-sharded token batches (grain).

Token streams: each split (see ``corpus.split_documents``) is tokenized once, documents
joined with ``eos`` after each one, and cached as ``<cache_dir>/tokens/<key>/{train,val}.npy``
(int32), keyed by the split's documents and the tokenizer's fingerprint.

Train order: the train stream is cut into ``W = len // (seq_len + 1)`` non-overlapping windows
of ``seq_len + 1`` tokens. Epoch ``e`` visits the windows in the order
``numpy.random.default_rng([seed, e]).permutation(W)``; global step ``s`` of epoch ``e`` takes
positions ``[p * B, (p + 1) * B)`` of that permutation (``p = s mod steps_per_epoch``,
``steps_per_epoch = W // B``; the last ``W mod B`` windows of each epoch's order are skipped).
Host ``i`` of ``n`` gets rows ``[i * B/n, (i + 1) * B/n)`` of each global batch. A batch is
``dict(inputs=int32[B/n, seq_len], targets=int32[B/n, seq_len])``.

Batch ``s`` is a pure function of ``s``, so the iterator state is just ``{"step": s}``:
resuming costs O(1) and is independent of the number of hosts. The batches are produced by a
``grain.MapDataset`` over step indices (``data.num_workers > 0`` moves batch assembly into grain
worker processes; the order is the same).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import os
import threading
from typing import Any, Iterator, Sequence

import numpy as np

from jaxlm.data import corpus
from jaxlm.data.tokenizer import Tokenizer

_INFINITE = 2 ** 62


class DataError(ValueError):
  pass


# ----------------------------------------------------------------------------
# Token streams.

@dataclasses.dataclass(frozen=True)
class SplitTokens:
  train_path: str
  val_path: str
  num_train_docs: int
  num_val_docs: int
  key: str


def _tokenize_stream(docs: Sequence[str], tokenizer: Tokenizer) -> np.ndarray:
  parts = []
  eos = np.array([tokenizer.eos_id], np.int32)
  chunk = 256
  for i in range(0, len(docs), chunk):
    for ids in tokenizer.encode_batch(docs[i:i + chunk]):
      parts.append(np.asarray(ids, np.int32))
      parts.append(eos)
  return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def _save_npy(path: str, arr: np.ndarray) -> None:
  buf = io.BytesIO()
  np.save(buf, arr, allow_pickle=False)
  corpus.atomic_write_bytes(path, buf.getvalue())


def prepare_tokens(cfg, tokenizer: Tokenizer, documents: Sequence[str] | None = None) -> SplitTokens:
  """Splits, tokenizes and caches both splits (once); returns where the .npy files are."""
  docs = corpus.load_documents(cfg) if documents is None else list(documents)
  train, val = corpus.split_documents(docs, float(getattr(cfg, "val_fraction", 0.05)))
  key = hashlib.sha256("|".join([
      "tokens-v1", corpus.documents_fingerprint(train), corpus.documents_fingerprint(val),
      tokenizer.fingerprint]).encode()).hexdigest()[:24]
  d = os.path.join(corpus.default_cache_dir(cfg), "tokens", key)
  paths = {}
  for name, split_docs in (("train", train), ("val", val)):
    path = os.path.join(d, f"{name}.npy")
    if not os.path.exists(path):
      _save_npy(path, _tokenize_stream(split_docs, tokenizer))
    paths[name] = path
  return SplitTokens(paths["train"], paths["val"], len(train), len(val), key)


def load_split_tokens(cfg, tokenizer: Tokenizer, split: str = "train") -> np.ndarray:
  """The cached int32 token stream of a split (memory-mapped)."""
  st = prepare_tokens(cfg, tokenizer)
  if split not in ("train", "val"):
    raise DataError(f"split must be 'train' or 'val', got {split!r}")
  return np.load(st.train_path if split == "train" else st.val_path, mmap_mode="r")


def unigram_entropy(tokens) -> float:
  """Entropy (nats/token) of the empirical unigram distribution of `tokens`."""
  tokens = np.asarray(tokens).reshape(-1)
  if tokens.size == 0:
    raise DataError("unigram_entropy of an empty token array")
  counts = np.bincount(tokens.astype(np.int64))
  p = counts[counts > 0] / tokens.size
  return float(-(p * np.log(p)).sum())


# ----------------------------------------------------------------------------
# Batch geometry checks.

def _check_geometry(seq_len, batch_size, process_index, process_count):
  if seq_len < 1:
    raise DataError(f"seq_len must be >= 1, got {seq_len}")
  if batch_size < 1:
    raise DataError(f"batch_size must be >= 1, got {batch_size}")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise DataError(f"process_index={process_index} must be in [0, process_count={process_count})")
  if batch_size % process_count:
    raise DataError(f"global batch_size={batch_size} is not divisible by process_count={process_count}; "
                    f"each host needs an equal slice (use a multiple of {process_count})")


def _num_windows(num_tokens, seq_len, batch_size, split, extra=""):
  w = num_tokens // (seq_len + 1)
  if w < batch_size:
    raise DataError(
        f"the {split} split has {num_tokens} tokens = {w} windows of seq_len+1={seq_len + 1} tokens, "
        f"fewer than one batch of batch_size={batch_size} windows (needs >= {batch_size * (seq_len + 1)} "
        f"tokens); use a larger corpus, a smaller seq_len or batch_size{extra}")
  return w


def _windows(tokens: np.ndarray, idx: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
  rows = (idx.astype(np.int64) * (seq_len + 1))[:, None] + np.arange(seq_len + 1)[None, :]
  w = np.asarray(tokens[rows], dtype=np.int32)
  return {"inputs": np.ascontiguousarray(w[:, :-1]), "targets": np.ascontiguousarray(w[:, 1:])}


# ----------------------------------------------------------------------------
# Train.

class _TrainBatchSource:
  """grain random-access source: element s = this host's slice of global batch s."""

  def __init__(self, tokens_path, num_windows, seq_len, batch_size, seed, process_index, process_count):
    self.tokens_path = tokens_path
    self.num_windows = num_windows
    self.seq_len = seq_len
    self.batch_size = batch_size
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.steps_per_epoch = num_windows // batch_size
    self._tokens = None
    self._perm = (None, None)
    self._lock = threading.Lock()

  def __getstate__(self):  # picklable for grain worker processes
    s = dict(self.__dict__)
    s["_tokens"], s["_perm"], s["_lock"] = None, (None, None), None
    return s

  def __setstate__(self, s):
    self.__dict__.update(s)
    self._lock = threading.Lock()

  def __len__(self):
    return _INFINITE

  def permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      if self._perm[0] != epoch:
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
        self._perm = (epoch, perm)
      return self._perm[1]

  def __getitem__(self, step: int) -> dict[str, np.ndarray]:
    if self._tokens is None:
      self._tokens = np.load(self.tokens_path, mmap_mode="r")
    epoch, pos = divmod(int(step), self.steps_per_epoch)
    local = self.batch_size // self.process_count
    start = pos * self.batch_size + self.process_index * local
    idx = self.permutation(epoch)[start:start + local]
    return _windows(self._tokens, idx, self.seq_len)


class TrainIterator(Iterator[dict]):
  """Infinite iterator of this host's train batches; `get_state()`/`set_state()` resume exactly."""

  def __init__(self, source: _TrainBatchSource, num_workers: int, fingerprint: str):
    self._source = source
    self._num_workers = int(num_workers)
    self._fingerprint = fingerprint
    self._step = 0
    self._it = None

  # Geometry.
  @property
  def num_windows(self) -> int:
    return self._source.num_windows

  @property
  def steps_per_epoch(self) -> int:
    return self._source.steps_per_epoch

  @property
  def step(self) -> int:
    return self._step

  @property
  def epoch(self) -> int:
    return self._step // self._source.steps_per_epoch

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """This host's batch number `step` (random access; does not move the iterator)."""
    return self._source[step]

  def _make_iter(self):
    import grain  # pylint: disable=g-import-not-at-top
    ds = grain.MapDataset.source(self._source)[self._step:]
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0, prefetch_buffer_size=0))
    if self._num_workers > 0:
      from absl import flags  # pylint: disable=g-import-not-at-top
      if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags (defaults are fine)
        flags.FLAGS.mark_as_parsed()
      it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self._num_workers,
                                                               per_worker_buffer_size=2))
    return iter(it_ds)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._it is None:
      self._it = self._make_iter()
    batch = next(self._it)
    self._step += 1
    return batch

  def get_state(self) -> dict[str, Any]:
    return {"step": self._step, "fingerprint": self._fingerprint}

  def set_state(self, state: dict[str, Any], strict: bool = False) -> None:
    """Continues at global step state["step"] (O(1); independent of the number of hosts).

    A state saved under a different data setup (corpus, tokenizer, seed, seq_len, batch_size)
    cannot be resumed exactly: with strict=True that is an error, otherwise a warning and the
    step count is kept.
    """
    fp = state.get("fingerprint")
    if fp is not None and fp != self._fingerprint:
      msg = (f"data iterator state was saved for a different data setup (fingerprint {fp}, this one "
             f"{self._fingerprint}: corpus, tokenizer, seed, seq_len or batch_size changed); "
             f"continuing at step {state.get('step')} of the new order")
      if strict:
        raise DataError(msg)
      logging.warning(msg)
    step = int(state["step"])
    if step < 0:
      raise DataError(f"data iterator state has negative step {step}")
    self._step = step
    self.close()  # rebuilt lazily from the new step

  def close(self) -> None:
    """Stops grain worker processes/threads (if any); iteration may continue afterwards."""
    it, self._it = self._it, None
    if it is not None and hasattr(it, "close"):
      it.close()


def make_train_iterator(cfg, *, tokenizer: Tokenizer, seq_len: int, batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1,
                        documents: Sequence[str] | None = None) -> TrainIterator:
  """This host's infinite train batches (see module docstring for the order)."""
  _check_geometry(seq_len, batch_size, process_index, process_count)
  if not 0 <= int(seed) < 2 ** 63:
    raise DataError(f"seed must be a non-negative integer, got {seed}")
  st = prepare_tokens(cfg, tokenizer, documents)
  num_tokens = int(np.load(st.train_path, mmap_mode="r").shape[0])
  w = _num_windows(num_tokens, seq_len, batch_size, "train")
  source = _TrainBatchSource(st.train_path, w, seq_len, batch_size, int(seed), process_index, process_count)
  fingerprint = hashlib.sha256(f"{st.key}|{seed}|{seq_len}|{batch_size}|{w}".encode()).hexdigest()[:16]
  return TrainIterator(source, getattr(cfg, "num_workers", 0) or 0, fingerprint)


# ----------------------------------------------------------------------------
# Validation.

class ValBatches(Sequence[dict]):
  """A fixed, re-iterable sequence of this host's validation batches (windows in stream order)."""

  def __init__(self, tokens_path, num_batches, seq_len, batch_size, process_index, process_count):
    self._tokens = np.load(tokens_path, mmap_mode="r")
    self._n = num_batches
    self._seq_len = seq_len
    self._batch_size = batch_size
    self._local = batch_size // process_count
    self._offset = process_index * self._local

  def __len__(self):
    return self._n

  def __getitem__(self, i):
    if isinstance(i, slice):
      return [self[j] for j in range(*i.indices(self._n))]
    if i < 0:
      i += self._n
    if not 0 <= i < self._n:
      raise IndexError(f"val batch {i} out of range [0, {self._n})")
    start = i * self._batch_size + self._offset
    return _windows(self._tokens, np.arange(start, start + self._local), self._seq_len)

  def __iter__(self):
    return (self[i] for i in range(self._n))


def make_val_batches(cfg, *, tokenizer: Tokenizer, seq_len: int, batch_size: int,
                     max_batches: int | None = None, process_index: int = 0, process_count: int = 1,
                     documents: Sequence[str] | None = None) -> ValBatches:
  """The validation batches: all full batches of the val split (at most `max_batches`)."""
  _check_geometry(seq_len, batch_size, process_index, process_count)
  st = prepare_tokens(cfg, tokenizer, documents)
  num_tokens = int(np.load(st.val_path, mmap_mode="r").shape[0])
  w = _num_windows(num_tokens, seq_len, batch_size, "val", extra=", or raise data.val_fraction")
  n = w // batch_size
  if max_batches is not None:
    n = min(n, int(max_batches))
  return ValBatches(st.val_path, n, seq_len, batch_size, process_index, process_count)
