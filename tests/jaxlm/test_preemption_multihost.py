"""Multi-host preemption: SIGTERM to ONE of two jax.distributed processes stops BOTH at the same
step (jax's preemption sync point), after one collective checkpoint, with status 75."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from launch.local_multiprocess import free_port  # noqa: E402


@pytest.mark.slow
def test_sigterm_to_one_host_stops_all_hosts_at_one_step(tmp_path):
  # Two documents: one for training, one held out for validation.
  text = tmp_path / "a.txt"
  text.write_text("To be, or not to be, that is the question.\n" * 400)
  (tmp_path / "b.txt").write_text("Or to take arms against a sea of troubles.\n" * 100)
  out = tmp_path / "run"
  args = [sys.executable, os.path.join(ROOT, "experiments/train.py"), "--config=tiny_cpu",
          "--set", "data.source=files", "--set", f"data.paths={text},{tmp_path / 'b.txt'}", "--set", "data.tokenizer=byte",
          "--set", "model.vocab_size=264", "--set", "model.d_model=32", "--set", "model.n_heads=2",
          "--set", "model.n_kv_heads=2", "--set", "model.d_ff=64", "--set", "model.n_layers=2",
          "--set", "train.seq_len=16", "--set", "train.batch_size=8", "--set", "train.steps=5000",
          "--set", "train.warmup_steps=1", "--set", "train.log_every=1",
          "--set", "train.eval_every=100000", "--set", "train.checkpoint_every=100000",
          "--set", "mesh.data=4", "--set", f"train.output_dir={out}", "--sample_tokens=0"]
  port = free_port()
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAXLM_COORDINATOR=f"127.0.0.1:{port}",
               JAXLM_NUM_PROCESSES="2", JAXLM_PROCESS_ID=str(i),
               XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs.append(subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL,
                                  stderr=open(tmp_path / f"p{i}.log", "w")))
  try:
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
      if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
        break
      if any(p.poll() is not None for p in procs):
        logs = "\n".join((tmp_path / f"p{i}.log").read_text()[-2000:] for i in range(2))
        pytest.fail(f"a process died before training:\n{logs}")
      time.sleep(0.5)
    else:
      pytest.fail("training did not start in time")
    procs[1].send_signal(signal.SIGTERM)  # only the second host is told
    codes = [p.wait(timeout=180) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  assert codes == [75, 75], codes
  steps = sorted(int(d) for d in os.listdir(out / "checkpoints") if d.isdigit())
  assert len(steps) == 1
  last_logged = json.loads(metrics.read_text().splitlines()[-1])["step"]
  assert steps[0] == last_logged  # the checkpoint holds the last step both hosts ran
