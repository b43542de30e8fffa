"""Start N cooperating JAX processes on this machine (127.0.0.1) — for tests and debugging
multi-host code without a cluster.

  python launch/local_multiprocess.py --num_processes=2 --devices_per_process=4 -- \
      experiments/train.py --config=tiny_cpu --set mesh.data=8

Each process gets JAXLM_COORDINATOR / JAXLM_NUM_PROCESSES / JAXLM_PROCESS_ID (read by
jaxlm.distributed.maybe_initialize) and, on CPU, `devices_per_process` host devices. Output of
process i goes to <log_dir>/process_<i>.log (process 0 is also echoed). Exit status: the first
non-zero status of any process, else 0.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(script_args: list[str], num_processes: int, devices_per_process: int,
           log_dir: str, timeout: float | None = None, extra_env: dict | None = None) -> list[int]:
  """Run `python script_args…` in `num_processes` processes; return their exit codes."""
  os.makedirs(log_dir, exist_ok=True)
  port = free_port()
  procs, logs = [], []
  for i in range(num_processes):
    env = dict(os.environ, **(extra_env or {}))
    env.update(JAXLM_COORDINATOR=f"127.0.0.1:{port}", JAXLM_NUM_PROCESSES=str(num_processes),
               JAXLM_PROCESS_ID=str(i), JAX_PLATFORMS=env.get("JAX_PLATFORMS", "cpu"))
    if env["JAX_PLATFORMS"] == "cpu":
      flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
      env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    log = open(os.path.join(log_dir, f"process_{i}.log"), "w")
    logs.append(log)
    procs.append(subprocess.Popen([sys.executable, *script_args], env=env, stdout=log,
                                  stderr=subprocess.STDOUT))
  deadline = None if timeout is None else time.time() + timeout
  codes = []
  try:
    for p in procs:
      remaining = None if deadline is None else max(deadline - time.time(), 0.1)
      codes.append(p.wait(timeout=remaining))
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    raise
  finally:
    for log in logs:
      log.close()
  return codes


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4)
  parser.add_argument("--log_dir", default="runs/local_multiprocess_logs")
  parser.add_argument("--timeout", type=float, default=None)
  parser.add_argument("script", nargs=argparse.REMAINDER, help="-- script.py [args…]")
  args = parser.parse_args()
  script = [a for a in args.script if a != "--"]
  if not script:
    parser.error("give the script to run after --")
  codes = launch(script, args.num_processes, args.devices_per_process, args.log_dir, args.timeout)
  with open(os.path.join(args.log_dir, "process_0.log")) as f:
    sys.stdout.write(f.read())
  bad = [c for c in codes if c]
  print(f"exit codes: {codes}", file=sys.stderr)
  sys.exit(bad[0] if bad else 0)


if __name__ == "__main__":
  main()
