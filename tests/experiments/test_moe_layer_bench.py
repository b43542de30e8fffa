"""experiments/bench/moe_layer.py on the CPU shapes, with the group-aligned variant rows."""
import math

from experiments.bench import moe_layer


def test_ci_rows_include_the_group_aligned_layer(monkeypatch):
  monkeypatch.setattr(moe_layer, "_ALIGNED_ROW_MIN_EXPERTS", 16)   # the CI UniPool has 16
  monkeypatch.setattr(moe_layer, "_ALIGN", 8)
  rows = moe_layer.run(shapes="ci", dtype="float32")
  names = {(r.shape.split()[3], r.impl) for r in rows}
  assert ("unipool", "moe[default, group_align 8]") in names
  assert ("unipool", "gmm only[default, group_align 8]") in names
  assert not any("group_align" in impl for kind, impl in names if kind == "vanilla")
  # the layer as the unipool presets run it (deferred pool gradient), UniPool only
  deferred = [impl for kind, impl in names if "deferred" in impl]
  assert [kind for kind, impl in names if "deferred" in impl] == ["unipool"], names
  assert deferred == ["moe[default, deferred pool grad, 24 layers]"]
  assert all(math.isfinite(r.ms) and r.ms > 0 for r in rows)
