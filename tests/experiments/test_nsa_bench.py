"""experiments/bench/nsa.py helpers: the neighbour overlap of a selection, smoothed queries."""
import jax.numpy as jnp
import numpy as np

from experiments.bench import nsa as nsa_bench
from ops.nsa.config import NSAConfig
from ops.nsa.shapes import NSAShape


def test_neighbour_overlap_counts_blocks_the_previous_query_chose():
  # [b=1, t=3, kvh=1, n=3]; -1 = no block
  idx = jnp.asarray([[[[0, 1, 2]], [[0, 2, 5]], [[5, -1, -1]]]], jnp.int32)
  # query 1: 0 and 2 of {0, 1, 2} (2 of 3); query 2: 5 of {0, 2, 5} (1 of 1)
  assert nsa_bench.neighbour_overlap(idx) == 3 / 4


def test_smoothed_queries_keep_the_scale_and_correlate_neighbours():
  cfg = NSAConfig()
  iid = nsa_bench.make_inputs(NSAShape(1, 512, 2, 1, 32), cfg, jnp.float32)[0]
  smooth = nsa_bench.make_inputs(NSAShape(1, 512, 2, 1, 32, q_smooth=64), cfg, jnp.float32)[0]
  assert smooth.shape == iid.shape
  np.testing.assert_allclose(float(jnp.std(smooth)), float(jnp.std(iid)), rtol=0.15)
  corr = lambda q: float(jnp.mean(q[:, 1:] * q[:, :-1]) / jnp.mean(q * q))
  assert corr(smooth) > 0.9 and abs(corr(iid)) < 0.1
