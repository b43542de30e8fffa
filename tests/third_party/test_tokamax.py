"""third_party/tokamax.py: the optional baseline never breaks a benchmark run."""
import importlib.util

from third_party import tokamax


def test_ragged_dot_is_none_or_callable_and_never_raises():
  fn = tokamax.ragged_dot()
  if importlib.util.find_spec("tokamax") is None:
    assert fn is None
  else:
    assert fn is None or callable(fn)
