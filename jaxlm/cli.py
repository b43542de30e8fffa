"""absl flags shared by every experiment script: --config=<preset> and repeatable --set."""
from __future__ import annotations

from absl import flags

from jaxlm import config as config_lib
from jaxlm import configs

_CONFIG = flags.DEFINE_string("config", "tiny_cpu", "named preset (see jaxlm/configs)")
_SET = flags.DEFINE_multi_string(
    "set", [], "override, repeatable: --set model.n_layers=4 --set train.lr=1e-3")


def config_from_flags() -> config_lib.Config:
  """The preset named by --config with every --set applied, validated."""
  return config_lib.apply_overrides(configs.get_preset(_CONFIG.value), _SET.value)


def fail(err: Exception) -> None:
  """Print a config/input error as one line and exit non-zero (no traceback)."""
  raise SystemExit(f"error: {err}")
