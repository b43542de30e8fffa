"""Faults provoked for real (issue #11): preemption signals, non-finite steps, broken
checkpoints, a full disk, changed configs on resume.

One uninterrupted training subprocess (`reference`) is shared by the module: its losses are the
ground truth for the SIGTERM-and-resume test and its checkpoints (steps 4, 8, 12) are copied and
damaged by the restore tests, which only build a Trainer and call `initial_state` (no compile).
The subprocesses share a persistent XLA compilation cache, so only the first one compiles.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from jaxlm import config as config_lib
from jaxlm import configs
from jaxlm.config import ConfigError
from tests.jaxlm.conftest import tiny_run_config, write_text_docs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN_PY = os.path.join(REPO, "experiments", "train.py")
STEPS, EVERY = 12, 4
PRESET = "tiny_cpu"


# ------------------------------------------------------------------ helpers

def _run_config(root, paths, **train):
  t = dict(steps=STEPS, warmup_steps=1, checkpoint_every=EVERY, keep_checkpoints=5,
           async_checkpoint=True, log_every=1, eval_every=1000)
  t.update(train)
  return tiny_run_config(root, paths, model=dict(n_heads=2, n_kv_heads=1), train=t)


def _flatten(d: dict, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _flatten(v, f"{prefix}{k}.")
    else:
      yield prefix + k, v


def _overrides(cfg) -> list[str]:
  """`--set` flags that turn the tiny_cpu preset into `cfg` (every differing leaf)."""
  base = dict(_flatten(config_lib.to_dict(configs.get_preset(PRESET))))
  out = []
  for key, value in _flatten(config_lib.to_dict(cfg)):
    if base[key] != value:
      text = ",".join(value) if isinstance(value, (tuple, list)) else str(value)
      out += ["--set", f"{key}={text}"]
  assert config_lib.apply_overrides(configs.get_preset(PRESET), out[1::2]) == cfg
  return out


def _train_cmd(cfg, wrapper: str | None = None) -> list[str]:
  """The command a user would type; `wrapper` (python source) runs first in the same process."""
  args = [f"--config={PRESET}", *_overrides(cfg), "--sample_tokens=0"]
  if wrapper is None:
    return [sys.executable, TRAIN_PY, *args]
  boot = (wrapper + "\nimport runpy, sys\n"
          f"sys.argv = [{TRAIN_PY!r}] + {args!r}\n"
          f"runpy.run_path({TRAIN_PY!r}, run_name='__main__')\n")
  return [sys.executable, "-c", boot]


def _env(cache_dir) -> dict:
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags), PYTHONUNBUFFERED="1",
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return env


def _losses(out_dir) -> dict[int, float]:
  """step -> loss from metrics.jsonl (a resumed run appends; a step logged twice must agree)."""
  out = {}
  with open(os.path.join(out_dir, "metrics.jsonl")) as f:
    for line in f:
      row = json.loads(line)
      prev = out.setdefault(row["step"], row["loss"])
      assert prev == row["loss"] or (np.isnan(prev) and np.isnan(row["loss"])), row
  return out


def _steps_on_disk(out_dir) -> list[int]:
  d = os.path.join(out_dir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


@dataclasses.dataclass
class Reference:
  root: str
  paths: list
  cfg: config_lib.Config
  env: dict
  losses: dict
  seconds: float

  @property
  def out_dir(self):
    return self.cfg.train.output_dir

  def config(self, name: str, **train):
    """The reference's config writing to <root>/<name> (training-only fields overridable)."""
    return _run_config(pathlib.Path(self.root) / name, self.paths, **train)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Reference:
  root = tmp_path_factory.mktemp("resilience")
  paths = write_text_docs(root / "text")
  cfg = _run_config(root / "reference", paths)
  env = _env(root / "xla_cache")
  t0 = time.perf_counter()
  proc = subprocess.run(_train_cmd(cfg), cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  losses = _losses(cfg.train.output_dir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  assert _steps_on_disk(cfg.train.output_dir) == [4, 8, 12]
  return Reference(str(root), paths, cfg, env, losses, time.perf_counter() - t0)


# ------------------------------------------------------------------ preemption

# Slows each step down (0.15 s before the batch moves to the device) so a signal lands mid-run.
_SLOW_STEPS = textwrap.dedent("""
    import time
    import jaxlm.train.loop as _loop
    _to_global = _loop.to_global
    def _slow(batch, mesh):
      time.sleep(0.15)
      return _to_global(batch, mesh)
    _loop.to_global = _slow
""")


def _wait_for_step(out_dir, proc, step: int, timeout=240.0):
  path = os.path.join(out_dir, "metrics.jsonl")
  t_end = time.monotonic() + timeout
  while time.monotonic() < t_end:
    if proc.poll() is not None:
      out, err = proc.communicate()
      pytest.fail(f"training exited with {proc.returncode} before step {step}:\n{err[-3000:]}")
    if os.path.exists(path):
      with open(path) as f:
        if sum(1 for line in f if line.endswith("\n")) >= step:
          return
    time.sleep(0.01)
  proc.kill()
  pytest.fail(f"no step {step} within {timeout}s")


def test_sigterm_checkpoints_exits_75_and_the_same_command_resumes_exactly(reference):
  from jaxlm.train.preemption import EXIT_PREEMPTED
  cfg = reference.config("preempted")
  out = cfg.train.output_dir
  proc = subprocess.Popen(_train_cmd(cfg, wrapper=_SLOW_STEPS), cwd=REPO, env=reference.env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _wait_for_step(out, proc, 5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == EXIT_PREEMPTED, stderr[-3000:]
  logged = _losses(out)
  stopped = max(logged)
  assert 5 <= stopped < STEPS, stopped
  assert sorted(logged) == list(range(1, stopped + 1))
  assert f"SIGTERM: checkpoint of step {stopped} committed; exiting with status 75" in stdout
  # the preemption checkpoint is the step the loop stopped at, committed (orbax lists only
  # finalized steps), next to the regular ones
  assert _steps_on_disk(out) == sorted({4, stopped} | ({8} if stopped >= 8 else set()))
  # the same command, without any wrapper, resumes and finishes
  proc = subprocess.run(_train_cmd(cfg), cwd=REPO, env=reference.env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"resumed from {os.path.join(out, 'checkpoints')} at step {stopped}" in proc.stdout
  resumed = _losses(out)
  assert sorted(resumed) == list(range(1, STEPS + 1))
  assert resumed == reference.losses  # bit-identical to the uninterrupted run
  assert _steps_on_disk(out)[-1] == STEPS


def test_second_signal_exits_at_once_without_checkpoint(tmp_path):
  """First SIGINT only sets the flag (the loop finishes its step); a second one exits now."""
  flag = tmp_path / "flag"
  code = textwrap.dedent(f"""
      import os, signal, sys, time
      from jaxlm.train.preemption import PreemptionWatcher
      w = PreemptionWatcher()
      with w.installed():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)
        assert w.requested and w.signal_name == "SIGINT", w.signal_name
        open({str(flag)!r}, "w").write("first signal handled, still running")
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)
      sys.exit(3)
  """)
  t0 = time.monotonic()
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=60)
  assert time.monotonic() - t0 < 20
  assert proc.returncode == 128 + signal.SIGINT, proc.stderr
  assert flag.read_text() == "first signal handled, still running"
  assert "SIGINT: finishing the current step" in proc.stderr
  assert "SIGINT again: exiting now without a checkpoint" in proc.stderr


# ------------------------------------------------------------------ broken checkpoints

def _copy_run(reference, name, **train):
  """A config writing to <root>/<name> whose checkpoints/ is a copy of the reference's."""
  cfg = reference.config(name, **train)
  shutil.copytree(os.path.join(reference.out_dir, "checkpoints"),
                  os.path.join(cfg.train.output_dir, "checkpoints"))
  return cfg


def _ckpt(cfg, step=None):
  d = os.path.join(cfg.train.output_dir, "checkpoints")
  return d if step is None else os.path.join(d, str(step))


def _array_file(step_dir):
  d = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
  return max((os.path.join(d, f) for f in os.listdir(d)), key=os.path.getsize)


def _truncate(step_dir):
  f = _array_file(step_dir)
  os.truncate(f, os.path.getsize(f) // 2)


def _flip_bytes(step_dir):  # 4 bytes in the middle of the array data, not a format error
  f = _array_file(step_dir)
  with open(f, "r+b") as fh:
    fh.seek(os.path.getsize(f) // 2)
    b = fh.read(4)
    fh.seek(os.path.getsize(f) // 2)
    fh.write(bytes(x ^ 0x01 for x in b))


def _remove_array_file(step_dir):
  os.remove(_array_file(step_dir))


def _garble(rel, content):
  def damage(step_dir):
    with open(os.path.join(step_dir, rel), "w") as f:
      f.write(content)
  return damage


def _silent_value_change(step_dir):
  """Models corruption that every format layer reads back without complaint: the stored
  checksum of one array no longer matches its (perfectly readable) values."""
  path = os.path.join(step_dir, "data", "metadata")
  with open(path) as f:
    data = json.load(f)
  data["_state_checksum"][5] ^= 1
  with open(path, "w") as f:
    json.dump(data, f)


DAMAGE = {
    "silent_value_change": _silent_value_change,
    "truncated_array_file": _truncate,
    "flipped_bytes": _flip_bytes,
    "missing_array_file": _remove_array_file,
    "garbled_tree_metadata": _garble("state/_METADATA", "{not json"),
    "garbled_config": _garble("config/metadata", "{not json"),
    "wrong_data_state": _garble("data/metadata", "[1, 2]"),
    "empty_step_dir": lambda d: [shutil.rmtree(d), os.makedirs(d)],
}


def _trainer(cfg):
  from jaxlm.train.loop import Trainer
  return Trainer(cfg, devices=jax.devices()[:1])


def _leaves_equal(a, b) -> bool:
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                    for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def reference_state8(reference):
  """The reference's step-8 TrainState, restored from its untouched checkpoint."""
  tr = _trainer(reference.cfg)
  try:
    state, data, _ = tr.ckpt.restore(8, tr.abstract_state)
    return jax.device_get(state), data
  finally:
    tr.close()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_broken_newest_checkpoint_falls_back_to_the_previous_one(reference, reference_state8,
                                                                 damage, capsys):
  cfg = _copy_run(reference, f"broken_{damage}")
  DAMAGE[damage](_ckpt(cfg, 12))
  tr = _trainer(cfg)
  try:
    state = tr.initial_state()
    assert int(state.step) == 8
    assert _leaves_equal(state, reference_state8[0])
    assert tr.train_iter.step == 8
    out = capsys.readouterr().out
    assert "warning: checkpoint step 12 is" in out and "trying an older one" in out, out
    if damage == "silent_value_change":
      assert "CorruptCheckpointError: step 12: the restored state does not match the checksum" in out
    assert f"resumed from {_ckpt(cfg)} at step 8" in out
    # the broken step is moved aside (not deleted), so training can write step 12 again
    assert tr.ckpt.all_steps() == [4, 8]
    broken = os.listdir(_ckpt(cfg) + ".broken")
    assert len(broken) == 1 and broken[0].startswith("12-")
  finally:
    tr.close()


def test_checkpoint_with_a_different_tree_structure_is_skipped(reference, reference_state8, capsys):
  """A step written with another state layout (a params subtree missing) is the newest."""
  cfg = _copy_run(reference, "wrong_tree")
  tr = _trainer(cfg)
  try:
    state8, data8 = reference_state8
    params = dict(state8.params)
    params.pop("final_norm")
    tr.ckpt.save(16, state8._replace(params=params), data8, config_lib.to_dict(cfg))
    tr.ckpt.wait()
    assert tr.ckpt.all_steps() == [4, 8, 12, 16]
    state = tr.initial_state()
    assert int(state.step) == 12
    out = capsys.readouterr().out
    assert "checkpoint step 16 is broken" in out and "tree structures do not match" in out, out
    assert tr.ckpt.all_steps() == [4, 8, 12]
  finally:
    tr.close()


def test_no_restorable_checkpoint_is_an_error_and_changes_nothing(reference):
  from jaxlm.train.loop import CheckpointRestoreError
  cfg = _copy_run(reference, "all_broken")
  for step in (4, 8, 12):
    _truncate(_ckpt(cfg, step))
  tr = _trainer(cfg)
  try:
    with pytest.raises(CheckpointRestoreError) as e:
      tr.initial_state()
    msg = str(e.value)
    assert all(f"step {s}: " in msg for s in (4, 8, 12)), msg
    assert "move that folder away to start from scratch" in msg
    assert tr.ckpt.all_steps() == [4, 8, 12]
    assert not os.path.exists(_ckpt(cfg) + ".broken")
  finally:
    tr.close()


def test_model_change_is_refused_listing_fields_training_changes_are_reported(reference, capsys):
  cfg = _copy_run(reference, "changed")
  bigger = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, d_model=64, n_layers=3))
  tr = _trainer(bigger)
  try:
    with pytest.raises(ConfigError) as e:
      tr.initial_state()
    msg = str(e.value)
    assert "model.d_model: checkpoint 32 != config 64" in msg, msg
    assert "model.n_layers: checkpoint 2 != config 3" in msg
    assert "model.d_ff" not in msg
    assert tr.ckpt.all_steps() == [4, 8, 12]  # refused, nothing moved aside
  finally:
    tr.close()
  t = dict(lr=2e-2, steps=20, log_every=5)
  changed = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **t))
  tr = _trainer(changed)
  try:
    assert int(tr.initial_state().step) == 12
    out = capsys.readouterr().out
    assert "resuming with a changed setting: train.lr: 0.01 -> 0.02" in out, out
    assert "resuming with a changed setting: train.steps: 12 -> 20" in out
    assert "resuming with a changed setting: train.log_every: 1 -> 5" in out
  finally:
    tr.close()


def test_same_command_resumes_past_a_truncated_checkpoint_and_rewrites_it(reference):
  """End to end: the newest checkpoint is cut in half; rerunning the command falls back to
  step 8, trains 9..12 with the reference's exact losses and writes step 12 again."""
  cfg = _copy_run(reference, "resume_truncated")
  _truncate(_ckpt(cfg, 12))
  proc = subprocess.run(_train_cmd(cfg), cwd=REPO, env=reference.env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "warning: checkpoint step 12 is broken" in proc.stdout, proc.stdout
  assert f"resumed from {_ckpt(cfg)} at step 8" in proc.stdout
  losses = _losses(cfg.train.output_dir)
  assert sorted(losses) == [9, 10, 11, 12]
  assert all(losses[s] == reference.losses[s] for s in losses), (losses, reference.losses)
  assert _steps_on_disk(cfg.train.output_dir) == [4, 8, 12]
  assert len(os.listdir(_ckpt(cfg) + ".broken")) == 1


# ------------------------------------------------------------------ non-finite steps

def test_nan_batches_are_skipped_then_the_run_stops_naming_step_and_checkpoint(reference,
                                                                               reference_state8):
  """Resume at step 8; batch 9 carries a NaN (loss_mask) -> skipped, state unchanged; batch 10
  is clean; 11 and 12 are NaN -> with max_nonfinite_steps=2 the run stops at step 12."""
  from jaxlm.train.loop import NonFiniteError
  cfg = reference.config("nan", max_nonfinite_steps=2)
  ck = _ckpt(cfg)
  for step in (4, 8):
    shutil.copytree(os.path.join(reference.out_dir, "checkpoints", str(step)), os.path.join(ck, str(step)))
  tr = _trainer(cfg)
  poisoned = {9, 11, 12}
  inner = tr.train_iter

  class Poisoned:  # the real batches plus a loss_mask, NaN in one token of poisoned steps
    def __next__(self):
      step = inner.step + 1
      batch = dict(next(inner))
      mask = np.ones(batch["targets"].shape, np.float32)
      if step in poisoned:
        mask[0, 3] = np.nan
      batch["loss_mask"] = mask
      return batch

    def __getattr__(self, name):
      return getattr(inner, name)

  tr.train_iter = Poisoned()
  seen = {}
  step_fn = tr.step_fn

  def recording(state, batch):
    before = jax.device_get(state)
    new, m = step_fn(state, batch)
    seen[int(before.step) + 1] = (before, jax.device_get(new), jax.device_get(m))
    return new, m

  tr.step_fn = recording
  try:
    with pytest.raises(NonFiniteError) as e:
      tr.run(progress=False)
  finally:
    tr.close()
  msg = str(e.value)
  assert msg.startswith("step 12: 2 consecutive steps had a non-finite loss"), msg
  assert f"last good checkpoint: step 8 in {ck}" in msg
  assert sorted(seen) == [9, 10, 11, 12]
  assert _leaves_equal(seen[9][0], reference_state8[0])
  for step in (9, 11, 12):
    before, after, m = seen[step]
    assert int(m["nonfinite"]) == 1 and not np.isfinite(float(m["loss"]))
    assert _leaves_equal(after.params, before.params)
    assert _leaves_equal(after.opt_state, before.opt_state)
    assert int(after.step) == step
  before, after, m = seen[10]
  assert int(m["nonfinite"]) == 0 and np.isfinite(float(m["loss"]))
  assert not _leaves_equal(after.params, before.params)  # a clean step updates again
  logged = _losses(cfg.train.output_dir)
  assert sorted(logged) == [9, 10, 11] and np.isnan(logged[9]) and np.isnan(logged[11])
  assert _steps_on_disk(cfg.train.output_dir) == [4, 8]  # nothing written after the NaNs


# ------------------------------------------------------------------ disk full

def _du(path) -> int:
  total = 0
  for d, _, files in os.walk(path):
    total += sum(-(-os.path.getsize(os.path.join(d, f)) // 4096) * 4096 for f in files)
  return total


@pytest.mark.skipif(shutil.which("unshare") is None, reason="needs unshare (util-linux)")
def test_disk_full_during_save_fails_loudly_and_keeps_older_checkpoints(reference, reference_state8):
  """checkpoints/ is a tmpfs (in a private mount namespace) with room for ~2.5 checkpoints;
  keep_checkpoints=2, so a deletion before the new step commits would also show."""
  cfg = reference.config("disk_full", keep_checkpoints=2)
  ck = _ckpt(cfg)
  os.makedirs(ck)
  size_kb = int(2.5 * _du(os.path.join(reference.out_dir, "checkpoints", "8")) // 1024)
  probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=4k tmpfs {ck}"],
                         capture_output=True, text=True)
  if probe.returncode:
    pytest.skip(f"cannot mount a tmpfs in a user namespace here: {probe.stderr.strip()}")
  copy = os.path.join(os.path.dirname(cfg.train.output_dir), "copy")
  cmd = " ".join(f"'{c}'" for c in _train_cmd(cfg))
  script = (f"mount -t tmpfs -o size={size_kb}k tmpfs '{ck}' || exit 99; {cmd}; rc=$?; "
            f"cp -a '{ck}' '{copy}'; exit $rc")
  proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, env=reference.env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert "writing the checkpoint of step 12" in errors[0] and "No space left on device" in errors[0]
  assert errors[0].endswith("the finished checkpoints are untouched: steps [4, 8]"), errors[0]
  # what was on the full disk: 4 and 8 complete, 12 only as orbax's temporary folder
  names = os.listdir(copy)
  assert sorted(n for n in names if n.isdigit()) == ["4", "8"], names
  assert all(n.startswith("12.orbax-checkpoint-tmp") for n in names if not n.isdigit()), names
  # a restart on a disk with room resumes from 8, exactly the reference's step-8 state
  shutil.rmtree(ck)
  shutil.copytree(copy, ck, symlinks=True)
  tr = _trainer(cfg)
  try:
    assert tr.ckpt.all_steps() == [4, 8]
    assert _leaves_equal(tr.initial_state(), reference_state8[0])
  finally:
    tr.close()


# ------------------------------------------------------------------ data faults

def _data_case(root, case):
  good = write_text_docs(root / "good", n_docs=4)
  if case == "missing_file":
    return good + [str(root / "nope.txt")], r"data file not found: .*nope\.txt"
  if case == "empty_file":
    (root / "empty.txt").write_bytes(b"")
    return good + [str(root / "empty.txt")], r"data file is empty: .*empty\.txt"
  if case == "undecodable_bytes":
    (root / "bad.txt").write_bytes(b"fine text \xff\xfe more")
    return good + [str(root / "bad.txt")], r"bad\.txt: bytes are not valid UTF-8 at byte offset 10"
  if case == "corpus_shorter_than_a_batch":
    return write_text_docs(root / "short", n_docs=3, n_words=5), r"fewer than one batch"
  raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing_file", "empty_file", "undecodable_bytes",
                                  "corpus_shorter_than_a_batch"])
def test_bad_training_data_is_one_clear_error(tmp_path, case):
  from jaxlm.data import CorpusError, DataError
  paths, pattern = _data_case(tmp_path, case)
  cfg = _run_config(tmp_path, paths)
  with pytest.raises((CorpusError, DataError), match=pattern):
    _trainer(cfg)


def test_documents_shorter_than_a_sequence_are_packed(tmp_path):
  """Many 3-token documents: joined with eos into one stream, every window is full."""
  p = tmp_path / "short.jsonl"
  p.write_text("".join(json.dumps({"text": f"d{i}"}) + "\n" for i in range(400)))
  tr = _trainer(_run_config(tmp_path, [str(p)]))
  batch = tr.train_iter.batch_at(0)
  assert batch["inputs"].shape == (4, 16)
  assert (batch["inputs"] == 256).sum() >= 4 * 16 // 4 - 4  # an eos every 3 tokens
  tr.close()


def test_vocab_too_small_for_the_tokenizer_names_the_field(tmp_path):
  paths = write_text_docs(tmp_path / "t", n_docs=2)
  cfg = _run_config(tmp_path, paths)
  with pytest.raises(ConfigError, match=r"model.vocab_size: byte tokenizer needs >= 257, got 200"):
    config_lib.validate(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=200)))


def test_cli_reports_a_bad_data_file_in_one_line(reference, tmp_path):
  (tmp_path / "empty.txt").write_bytes(b"")
  cfg = _run_config(tmp_path, list(reference.paths) + [str(tmp_path / "empty.txt")])
  proc = subprocess.run(_train_cmd(cfg), cwd=REPO, env=reference.env, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip() == f"error: data file is empty: {tmp_path / 'empty.txt'}", proc.stderr
