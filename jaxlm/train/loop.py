"""The training loop: data → jitted step → metrics / eval / checkpoints, resumable."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import jax
import numpy as np

from jaxlm import config as config_lib
from jaxlm import sharding
from jaxlm.config import Config
from jaxlm.data import get_tokenizer, make_train_iterator, make_val_batches
from jaxlm.evaluate import mean_loss
from jaxlm.models import build, layer_layout
from jaxlm.train import metrics as metrics_lib
from jaxlm.train import resume_compat
from jaxlm.train.checkpoint import Checkpointer, CorruptCheckpointError
from jaxlm.train.model_flops import train_flops_per_token
from jaxlm.train.preemption import PreemptionWatcher, Preempted
from jaxlm.train.optimizer import make_optimizer
from jaxlm.train.state import init_state, state_layout
from jaxlm.train.step import jit_eval_step, jit_train_step

log = logging.getLogger(__name__)


def to_global(batch: dict, mesh) -> dict:
  """Host-local numpy batch → global jax arrays sharded over the batch axes."""
  sh = sharding.batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v)) for k, v in batch.items()}


def window_means(vals: list[dict]) -> dict:
  """Mean of every metric over a logging window; vector metrics (per-layer loads, spike
  rates…) become one scalar per element, `name/i`; `nonfinite` is a count."""
  row = {}
  for k in vals[0]:
    stacked = np.stack([np.asarray(v[k], np.float64) for v in vals])
    if k == "nonfinite":
      row[k] = int(stacked.sum())
    elif k != "tokens":
      mean = stacked.mean(axis=0)
      if mean.ndim == 0:
        row[k] = float(mean)
      else:
        row.update({f"{k}/{i}": float(x) for i, x in enumerate(mean.ravel())})
  return row


def check_resume_config(stored: dict, cfg: Config) -> list[str]:
  """The model must match the checkpoint's except in how it is executed (kernels, remat,
  layer scanning: resume_compat.EXECUTION_FIELDS); returns the changed settings to report."""
  stored_cfg = config_lib.from_dict(stored)
  blocking, execution = resume_compat.model_differences(stored_cfg.model, cfg.model)
  if blocking:
    raise config_lib.ConfigError(
        "cannot resume: the model differs from the checkpoint's:\n  " + "\n  ".join(blocking))
  if stored_cfg.train.mu_dtype != cfg.train.mu_dtype:   # the optimizer state's own layout
    raise config_lib.ConfigError(
        f"cannot resume: train.mu_dtype is {stored_cfg.train.mu_dtype!r} in the checkpoint and "
        f"{cfg.train.mu_dtype!r} in the config (the stored first moment has the former dtype)")
  changed = list(execution)
  for section in ("train", "data", "mesh"):
    old, new = getattr(stored_cfg, section), getattr(cfg, section)
    changed += [f"{section}.{f.name}: {getattr(old, f.name)!r} -> {getattr(new, f.name)!r}"
                for f in dataclasses.fields(new) if getattr(old, f.name) != getattr(new, f.name)]
  return changed


class NonFiniteError(RuntimeError):
  """Too many consecutive steps with a non-finite loss or gradient."""


class CheckpointRestoreError(RuntimeError):
  """Checkpoints exist, but none of them could be restored."""


@dataclasses.dataclass
class RunResult:
  final_step: int
  val_loss: float | None
  train_loss: float | None
  tokens_per_s: float | None
  mfu: float | None
  seconds: float


class Trainer:
  """Everything one run needs, built once from a validated Config."""

  def __init__(self, cfg: Config, devices=None):
    config_lib.validate(cfg)
    self.cfg = cfg
    self.mesh = sharding.mesh_for(cfg, devices)
    self.is_main = jax.process_index() == 0
    self.fm = build(cfg.model)
    self.tx = make_optimizer(cfg.train, self.fm.logical_axes)
    self.tokenizer = get_tokenizer(cfg.data, cfg.model.vocab_size)
    self.abstract_state, self.state_shardings = state_layout(self.fm, self.tx, self.mesh)
    self.out_dir = cfg.train.output_dir
    self.ckpt = Checkpointer(os.path.join(self.out_dir, "checkpoints"),
                             keep=cfg.train.keep_checkpoints, async_save=cfg.train.async_checkpoint)
    t = cfg.train
    self.train_iter = make_train_iterator(
        cfg.data, tokenizer=self.tokenizer, seq_len=t.seq_len, batch_size=t.batch_size,
        seed=t.seed, process_index=jax.process_index(), process_count=jax.process_count())
    self.val_batches = make_val_batches(
        cfg.data, tokenizer=self.tokenizer, seq_len=t.seq_len, batch_size=t.batch_size,
        max_batches=t.eval_batches, process_index=jax.process_index(),
        process_count=jax.process_count())
    self.step_fn = jit_train_step(self.fm, cfg, self.tx, self.mesh, self.state_shardings)
    self.eval_fn = jit_eval_step(self.fm, self.mesh, self.state_shardings.params,
                                 cfg.train.loss_chunks)
    self.flops_per_token = train_flops_per_token(cfg.model, t.seq_len)
    self.peak = metrics_lib.peak_tflops(jax.devices()[0].device_kind, t.peak_tflops)

  # ------------------------------------------------------------------ state
  def initial_state(self):
    """Restore the newest readable checkpoint if there is one, else initialise.

    Checkpoints are tried newest first. One that fails to restore (truncated, corrupted or
    missing files, a wrong tree structure, a checksum mismatch, non-finite values) is skipped
    with a warning; once an older one restores, the broken newer ones are moved aside to
    `<checkpoints>.broken/` (nothing is deleted) so that training can write those steps again.
    If checkpoints exist but none restores, CheckpointRestoreError lists why (and nothing is
    moved). A checkpoint whose model differs from the config stops the run with a ConfigError.
    """
    steps = self.ckpt.all_steps()
    broken: list[tuple[int, str]] = []
    for step in reversed(steps):
      try:
        stored = self.ckpt.restore_config(step)
        if not isinstance(stored, dict):
          raise CorruptCheckpointError(f"stored config is a {type(stored).__name__}, not a dict")
      except Exception as e:  # unreadable metadata: try an older step
        broken.append((step, self._skip(step, "is unreadable", e)))
        continue
      changed = check_resume_config(stored, self.cfg)
      try:
        state, data_state, _ = self._restore(step, config_lib.from_dict(stored).model)
        self.train_iter.set_state(data_state)
      except Exception as e:
        broken.append((step, self._skip(step, "is broken", e)))
        continue
      for bad, _ in broken:
        moved = self.ckpt.quarantine(bad)
        self._warn(f"moved the broken checkpoint of step {bad} to {moved or '(another host)'}")
      for line in changed:
        self._warn(f"resuming with a changed setting: {line}")
      if self.is_main:
        print(f"resumed from {self.ckpt.directory} at step {step}", flush=True)
      return state
    if steps:
      raise CheckpointRestoreError(
          f"none of the checkpoints in {self.ckpt.directory} could be restored:\n  " +
          "\n  ".join(f"step {s}: {why}" for s, why in broken) +
          "\nnothing was changed on disk; move that folder away to start from scratch")
    return init_state(self.fm, self.tx, self.cfg.train.seed, self.mesh)

  def _restore(self, step: int, stored_model):
    """ckpt.restore onto this run's layout; a checkpoint of the other layer layout
    (model.scan_layers) is restored in its own layout, then converted on the devices (both
    layouts are held for that moment: twice the state's memory)."""
    if stored_model.scan_layers == self.cfg.model.scan_layers:
      return self.ckpt.restore(step, self.abstract_state)
    fm = build(dataclasses.replace(self.cfg.model, scan_layers=stored_model.scan_layers))
    abstract, _ = state_layout(fm, make_optimizer(self.cfg.train, fm.logical_axes), self.mesh)
    state, data_state, config = self.ckpt.restore(step, abstract)
    convert = jax.jit(lambda s: layer_layout.convert_layer_layout(s, self.cfg.model.scan_layers),
                      out_shardings=self.state_shardings)
    return convert(state), data_state, config

  def _skip(self, step: int, what: str, e: Exception) -> str:
    why = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:300]}"
    self._warn(f"checkpoint step {step} {what} ({why}); trying an older one")
    return why

  def _warn(self, msg: str):
    log.warning(msg)
    if self.is_main:
      print(f"warning: {msg}", flush=True)

  def save(self, state):
    step = int(jax.device_get(state.step))
    self.ckpt.save(step, state, self.train_iter.get_state(), config_lib.to_dict(self.cfg))

  # ------------------------------------------------------------------ eval
  def evaluate(self, params) -> dict:
    with sharding.use_mesh(self.mesh):
      return mean_loss(self.eval_fn, params, self.val_batches, lambda b: to_global(b, self.mesh))

  # ------------------------------------------------------------------ loop
  def run(self, stop_after: int | None = None, progress: bool = True) -> RunResult:
    """Train to train.steps (or stop after `stop_after` steps of this call)."""
    t = self.cfg.train
    t_start = time.perf_counter()
    state = self.initial_state()
    start = int(jax.device_get(state.step))
    end = t.steps if stop_after is None else min(t.steps, start + stop_after)
    writer = metrics_lib.MetricWriter(os.path.join(self.out_dir, "tensorboard"), self.is_main)
    jsonl = open(os.path.join(self.out_dir, "metrics.jsonl"), "a") if self.is_main else None
    bar = None
    if progress and self.is_main:
      from tqdm import tqdm
      bar = tqdm(total=t.steps, initial=start, desc=self.cfg.name, dynamic_ncols=True)
    pending, window_t0 = [], time.perf_counter()
    last_train, last_val, tok_s, mfu = None, None, None, None
    consecutive_bad = 0
    watcher = PreemptionWatcher()
    try:
      with sharding.use_mesh(self.mesh), watcher.installed():
        for step in range(start, end):
          batch = to_global(next(self.train_iter), self.mesh)
          state, m = self.step_fn(state, batch)
          pending.append(m)
          done = step + 1
          stop = watcher.should_stop(done)
          if done % t.log_every == 0 or done == end or stop:
            vals = jax.device_get(pending)
            elapsed = time.perf_counter() - window_t0
            tokens = sum(float(v["tokens"]) for v in vals)
            tok_s = tokens / max(elapsed, 1e-9)
            mfu = (tok_s * self.flops_per_token / (self.peak * 1e12 * jax.device_count())
                   if self.peak else None)
            row = window_means(vals)
            for v in vals:
              consecutive_bad = consecutive_bad + 1 if int(v["nonfinite"]) else 0
            if consecutive_bad >= t.max_nonfinite_steps:
              good = self.ckpt.latest_step()
              raise NonFiniteError(
                  f"step {done}: {consecutive_bad} consecutive steps had a non-finite loss or "
                  f"gradient (updates skipped); last good checkpoint: "
                  f"{'step ' + str(good) if good is not None else 'none'} in {self.ckpt.directory}")
            row.update(tokens_per_s=tok_s, **({"mfu": mfu} if mfu is not None else {}))
            last_train = row["loss"]
            writer.scalars(done, row, "train/")
            if jsonl:
              for i, v in enumerate(vals):
                jsonl.write(json.dumps({"step": done - len(vals) + i + 1, "loss": float(v["loss"])}) + "\n")
              jsonl.flush()
            if bar is not None:
              bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{tok_s:,.0f}")
              bar.update(len(vals))
            pending, window_t0 = [], time.perf_counter()
          if done % t.eval_every == 0 or done == t.steps:
            ev = self.evaluate(state.params)
            last_val = ev["loss"]
            writer.scalars(done, ev, "val/")
            if bar is not None:
              bar.write(f"step {done}: val loss {ev['loss']:.4f}  ppl {ev['perplexity']:.2f}")
          if done % t.checkpoint_every == 0 or done == end or stop:
            self.save(state)
          if stop:
            self.ckpt.wait()
            if self.is_main:
              print(f"{watcher.signal_name}: checkpoint of step {done} committed; exiting with "
                    f"status {Preempted(done).code}", flush=True)
            raise Preempted(done)
      self.ckpt.wait()
    finally:
      if bar is not None:
        bar.close()
      writer.close()
      if jsonl:
        jsonl.close()
    self.state = state
    return RunResult(int(jax.device_get(state.step)), last_val, last_train, tok_s, mfu,
                     time.perf_counter() - t_start)

  def close(self):
    self.ckpt.close()
