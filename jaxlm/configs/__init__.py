"""Named presets: `get_preset("tiny_cpu")`. Each preset module exposes PRESETS: name -> Config."""
from jaxlm.config import Config, ConfigError
from jaxlm.configs import dense, moe, nsa, symboliclight

_REGISTRY: dict[str, Config] = {}
for _module in (dense, moe, symboliclight, nsa):
  _REGISTRY.update(_module.PRESETS)


def names() -> tuple[str, ...]:
  return tuple(sorted(_REGISTRY))


def get_preset(name: str) -> Config:
  if name not in _REGISTRY:
    raise ConfigError(f"--config={name!r}: unknown preset; choose from {', '.join(names())}")
  return _REGISTRY[name]
