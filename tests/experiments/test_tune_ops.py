"""experiments/tune_ops.py: flag parsing, the NSA workload and a whole LIF sweep on the CPU with
fake timings (real timing needs the GPU)."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from absl import app

from experiments import tune_ops
from ops import nsa as nsa_op
from ops.nsa.config import NSAConfig


def test_parse_shape_per_op():
  assert tune_ops.parse_shape("1,8192,8192,float32") == (1, 8192, 8192, "float32")
  assert tune_ops.parse_shape("1,65536,64,4,128,bfloat16", "nsa") == (1, 65536, 64, 4, 128,
                                                                      "bfloat16")
  with pytest.raises(app.UsageError, match="batch,time,heads,kv_heads,head_dim,dtype"):
    tune_ops.parse_shape("1,8192,8192,float32", "nsa")
  with pytest.raises(app.UsageError, match="not a multiple of kv_heads"):
    tune_ops.parse_shape("1,64,6,4,16,float32", "nsa")
  with pytest.raises(app.UsageError, match="positive"):
    tune_ops.parse_shape("1,0,8,float32")


def test_parse_grid_names_the_nsa_config_fields():
  fields = {"sel_num_warps", "bwd_chunk"}
  assert tune_ops.parse_grid(["sel_num_warps=4,8", "bwd_chunk=32"], fields) == {
      "sel_num_warps": [4, 8], "bwd_chunk": [32]}
  with pytest.raises(app.UsageError, match="'block_q' is not a config field"):
    tune_ops.parse_grid(["block_q=16"], fields)
  cls = tune_ops._config_class("nsa")
  assert "sel_num_warps" in {f.name for f in dataclasses.fields(cls)}


def test_nsa_workload_runs_the_configured_kernels():
  """On CPU the Triton kernels run in interpret mode: the swept config reaches them and the
  outputs equal the XLA implementation's."""
  make_fns, a_f, a_fb, (name, ms_f, ms_fb) = tune_ops._nsa_workload((1, 96, 4, 2, 16, "float32"))
  assert name == "XLA" and ms_f > 0 and ms_fb > 0
  cfg = tune_ops._config_class("nsa")().replace(bwd_chunk=16, sel_num_warps=8)
  fwd, fwd_bwd = make_fns(cfg)
  out = fwd(*a_f)
  want = nsa_op.nsa(*a_f, cfg=NSAConfig(), implementation="xla")
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=2e-4, atol=2e-4)
  _, grads = fwd_bwd(*a_fb)
  assert len(grads) == 8 and all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_nsa_decode_workload_runs_the_configured_kernels():
  """The decode sweep: shape parsing, the full-decode baseline, and the swept config reaching
  the Triton decode kernels (interpret mode on CPU), whose output equals the "xla" decode."""
  from ops.nsa import decode as nsa_decode
  assert tune_ops.parse_shape("8,65536,64,4,128,bfloat16", "nsa_decode") == (
      8, 65536, 64, 4, 128, "bfloat16")
  with pytest.raises(app.UsageError, match="batch,cache,heads,kv_heads,head_dim,dtype"):
    tune_ops.parse_shape("1,8192,8192,float32", "nsa_decode")
  make_fns, args, (name, ms_full) = tune_ops._nsa_decode_workload((2, 160, 8, 2, 16, "float32"))
  assert name == "full decode" and ms_full > 0
  cfg = tune_ops._config_class("nsa_decode")().replace(decode_cmp_splits=2,
                                                       decode_cmp_block_k=16,
                                                       decode_select_block=1)
  dec, none = make_fns(cfg)
  assert none is None
  want = nsa_decode.nsa_decode(*args, cfg=NSAConfig(), implementation="xla")
  np.testing.assert_allclose(np.asarray(dec(*args)), np.asarray(want), rtol=2e-4, atol=2e-4)


_SWEEP_ON_CPU = """
import functools, sys
import jax
import ops.lif
ops.lif.lif = functools.partial(ops.lif.lif, interpret=True)
from absl import app
from experiments import tune_ops
from experiments.bench import timing
copies = iter([1000.0, 1250.0])
timing.copy_bandwidth_gbs = lambda: next(copies)
# the forward moves 2 * 64 * 64 * 4 + 2 * 64 * 4 = 33280 bytes: 1250 GB/s in this many ms
def fake_time(fn, *a, **k):
  jax.block_until_ready(fn(*a))
  return 33280 / 1.25e12 * 1e3
timing.time_pipelined = fake_time
jax.default_backend = lambda: "gpu"
sys.argv = ["tune_ops", "--op=lif", "--shape=1,64,64,float32", "--grid=block_c=32,64",
            "--grid=segment=0,12"]
app.run(tune_ops.main)
"""


def test_sweep_table_uses_the_higher_copy_measurement():
  """The whole sweep on the CPU (interpret mode, fake timings at which the forward moves 1250
  GB/s, copies of 1000 and 1250 GB/s): ratios against the higher copy, rejected configs listed
  as skipped."""
  import os
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  proc = subprocess.run([sys.executable, "-c", _SWEEP_ON_CPU], cwd=root, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, PYTHONPATH=root))
  assert proc.returncode == 0, proc.stderr[-3000:]
  table = proc.stdout[proc.stdout.index("### lif"):]
  assert "copy 1250 GB/s, the higher of 1000 before and 1250 after" in table
  assert "| block_c=32 segment=0 | 0.000 | 100% |" in table, table   # not 125% of 1000
  assert table.count("skipped: LifConfig.segment (12)") == 2
