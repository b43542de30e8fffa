"""Frozen configuration dataclasses, string overrides and validation.

One config path: a named preset (jaxlm/configs) plus `section.field=value`
overrides (absl `--set`), validated before anything compiles. Every error is a
ConfigError whose message starts with the dotted name of the offending field.

The definitions live in four modules, one job each; this module re-exports all of their
public names, so `from jaxlm.config import X` and `config_lib.X` are the way to use them:
  config_model.py      ModelConfig and its AttentionConfig / MoEConfig / SpikingConfig parts
  config_run.py        TrainConfig, DataConfig, MeshConfig, the root Config and ConfigError
  config_validate.py   validate, validate_for_devices and the allowed values of string fields
  config_overrides.py  apply_overrides (`section.field=value`), to_dict / from_dict
"""
from jaxlm.config_model import AttentionConfig, ModelConfig, MoEConfig, SpikingConfig
from jaxlm.config_overrides import apply_overrides, from_dict, to_dict
from jaxlm.config_run import Config, ConfigError, DataConfig, MeshConfig, TrainConfig
from jaxlm.config_validate import (ATTENTION_KINDS, DTYPES, MODEL_KINDS, MOE_KINDS, REMAT, ROUTERS,
                                   SPIKING_ENCODERS, SPIKING_HEADS, SPIKING_MIXERS,
                                   SPIKING_RESETS, SPIKING_SURROGATES, validate,
                                   validate_for_devices)

__all__ = [
    "ATTENTION_KINDS", "AttentionConfig", "Config", "ConfigError", "DTYPES", "DataConfig",
    "MODEL_KINDS", "MOE_KINDS", "MeshConfig", "ModelConfig", "MoEConfig", "REMAT", "ROUTERS",
    "SPIKING_ENCODERS", "SPIKING_HEADS", "SPIKING_MIXERS", "SPIKING_RESETS",
    "SPIKING_SURROGATES", "SpikingConfig", "TrainConfig", "apply_overrides", "from_dict",
    "to_dict", "validate", "validate_for_devices",
]
