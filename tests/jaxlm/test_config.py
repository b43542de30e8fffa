"""Config dataclasses, `section.field=value` overrides and validation: every bad input is one
ConfigError whose message starts with the offending field's dotted name."""
from __future__ import annotations

import dataclasses
import json
import typing

import jax
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxlm import configs, sharding
from jaxlm.config import (AttentionConfig, Config, ConfigError, ModelConfig, apply_overrides, from_dict,
                          to_dict, validate, validate_for_devices)

BASE = configs.get_preset("tiny_cpu")


def _all_keys(cls=Config, prefix="") -> list[str]:
  out = []
  for name, tp in typing.get_type_hints(cls).items():
    if dataclasses.is_dataclass(tp):
      out += _all_keys(tp, f"{prefix}{name}.")
    else:
      out.append(prefix + name)
  return out


ALL_KEYS = _all_keys()


def _error(overrides, base=BASE) -> str:
  with pytest.raises(ConfigError) as info:
    apply_overrides(base, overrides)
  return str(info.value)


def test_key_set_is_what_the_tests_assume():
  assert "model.attention.window" in ALL_KEYS and "train.grad_accum" in ALL_KEYS
  assert "data.paths" in ALL_KEYS and "mesh.data" in ALL_KEYS


# ------------------------------------------------------------------ bad inputs

def test_unknown_key_names_it_and_lists_valid_keys():
  msg = _error(["model.n_layer=4"])
  assert msg.startswith("model.n_layer:")
  assert "valid keys" in msg
  for valid in ("model.n_layers", "model.d_model", "model.attention"):
    assert valid in msg


def test_unknown_nested_and_top_level_keys():
  msg = _error(["model.attention.windw=3"])
  assert msg.startswith("model.attention.windw:") and "model.attention.window" in msg
  msg = _error(["modle.n_layers=3"])
  assert msg.startswith("modle.n_layers:") and "model" in msg and "train" in msg


def test_section_and_subfield_misuse():
  assert _error(["model=3"]).startswith("model:")
  assert _error(["model.d_model.x=3"]).startswith("model.d_model.x:")


@pytest.mark.parametrize("override,field", [
    ("model.n_layers=abc", "model.n_layers"),
    ("model.n_layers=2.5", "model.n_layers"),
    ("model.scan_layers=maybe", "model.scan_layers"),
    ("train.lr=fast", "train.lr"),
    ("train.lr=nan", "train.lr"),
    ("train.lr=inf", "train.lr"),
    ("model.attention.window=x", "model.attention.window"),
])
def test_wrong_type(override, field):
  msg = _error([override])
  assert msg.startswith(field + "=") or msg.startswith(field + ":"), msg


def test_malformed_override_strings():
  assert "expected the form" in _error(["model.n_layers"])
  assert "not a dotted field name" in _error(["model..n_layers=2"])
  assert "not a dotted field name" in _error(["=2"])


@pytest.mark.parametrize("overrides,field", [
    (["model.d_model=32", "model.n_heads=3", "model.n_kv_heads=3"], "model.n_heads"),
    (["model.n_heads=4", "model.n_kv_heads=3"], "model.n_kv_heads"),
    (["train.seq_len=1024", "model.max_seq_len=512"], "train.seq_len"),
    (["train.batch_size=12", "train.grad_accum=5"], "train.grad_accum"),
    (["train.steps=10", "train.warmup_steps=10"], "train.warmup_steps"),
    (["train.steps=10", "train.warmup_steps=50"], "train.warmup_steps"),
    (["model.attention.kind=sliding", "model.attention.window=0"], "model.attention.window"),
    (["model.attention.kind=local"], "model.attention.kind"),
    (["model.remat=some"], "model.remat"),
    (["model.dtype=float8"], "model.dtype"),
    (["model.n_layers=0"], "model.n_layers"),
    (["data.source=files"], "data.paths"),
    (["data.tokenizer=byte", "model.vocab_size=100"], "model.vocab_size"),
    (["mesh.data=0"], "mesh.data"),
])
def test_inconsistent_values_name_the_field(overrides, field):
  msg = _error(overrides)
  assert msg.startswith(field + ":"), msg


def test_validate_catches_bad_types_set_directly():
  bad = dataclasses.replace(BASE, model=dataclasses.replace(BASE.model, n_layers="4"))
  with pytest.raises(ConfigError, match=r"^model\.n_layers:"):
    validate(bad)
  bad = dataclasses.replace(BASE, model=dataclasses.replace(BASE.model, scan_layers=1))
  with pytest.raises(ConfigError, match=r"^model\.scan_layers:"):
    validate(bad)
  bad = dataclasses.replace(BASE, train=dataclasses.replace(BASE.train, lr=True))
  with pytest.raises(ConfigError, match=r"^train\.lr:"):
    validate(bad)


def test_batch_not_divisible_by_data_axis():
  cfg = apply_overrides(BASE, ["mesh.data=8", "train.batch_size=12"])  # device-free checks pass
  with pytest.raises(ConfigError, match=r"^train\.batch_size:.*12"):
    validate_for_devices(cfg, 8)
  assert jax.device_count() == 8, "tests/conftest.py sets 8 simulated CPU devices"
  with pytest.raises(ConfigError, match=r"^train\.batch_size:"):
    sharding.mesh_for(cfg)
  ok = apply_overrides(BASE, ["mesh.data=8", "train.batch_size=16"])
  assert validate_for_devices(ok, 8) == (8, 1, 1, 1)
  # grad_accum shrinks the micro-batch: 16 / 4 = 4 rows cannot split over 8 devices.
  bad = apply_overrides(BASE, ["mesh.data=8", "train.batch_size=16", "train.grad_accum=4"])
  with pytest.raises(ConfigError, match=r"^train\.batch_size:"):
    validate_for_devices(bad, 8)


def test_mesh_resolution_errors():
  cfg = apply_overrides(BASE, ["mesh.data=3"])
  with pytest.raises(ConfigError, match=r"^mesh"):
    validate_for_devices(cfg, 8)
  cfg = apply_overrides(BASE, ["mesh.data=-1", "mesh.fsdp=-1"])
  with pytest.raises(ConfigError, match=r"^mesh"):
    validate_for_devices(cfg, 8)
  cfg = apply_overrides(BASE, ["mesh.data=-1", "mesh.tensor=2", "train.batch_size=8"])
  assert validate_for_devices(cfg, 8) == (4, 1, 2, 1)
  mesh = sharding.mesh_for(cfg)
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2, "expert": 1}


def test_unknown_preset():
  with pytest.raises(ConfigError, match="tiny_cpu") as info:
    configs.get_preset("tiny_gpu")
  assert "tiny_gpu" in str(info.value)


# ------------------------------------------------------------------ overrides that work

def test_overrides_apply():
  cfg = apply_overrides(BASE, [
      "model.attention.kind=sliding", "model.attention.window=8", "data.source=files",
      "data.paths=a.txt, b/*.jsonl", "model.scan_layers=false", "train.async_checkpoint=yes",
      "model.n_layers=1_0", "train.lr=2e-4", "train.steps=1e3", "model.tie_embeddings=1"])
  assert cfg.model.attention == AttentionConfig(kind="sliding", window=8)
  assert cfg.data.paths == ("a.txt", "b/*.jsonl")
  assert cfg.model.scan_layers is False and cfg.train.async_checkpoint is True
  assert cfg.model.tie_embeddings is True
  assert cfg.model.n_layers == 10 and cfg.train.steps == 1000
  assert cfg.train.lr == 2e-4 and isinstance(cfg.train.lr, float)
  # untouched fields keep the preset's values; the preset itself is not mutated
  assert cfg.model.d_model == BASE.model.d_model
  assert BASE.model.attention.kind == "full"


def test_later_overrides_win():
  cfg = apply_overrides(BASE, ["model.n_layers=2", "model.n_layers=3"])
  assert cfg.model.n_layers == 3


def test_int_field_accepts_float_override_only_when_integral():
  assert apply_overrides(BASE, ["train.checkpoint_every=2.0"]).train.checkpoint_every == 2
  assert _error(["train.checkpoint_every=2.5"]).startswith("train.checkpoint_every=")


def test_to_dict_from_dict_round_trip():
  cfg = apply_overrides(BASE, ["data.source=files", "data.paths=x.txt,y.txt",
                               "model.attention.kind=sliding", "model.attention.window=5"])
  d = to_dict(cfg)
  assert from_dict(d) == cfg
  # through JSON (what checkpoints store): tuples come back as lists and are restored
  assert from_dict(json.loads(json.dumps(d))) == cfg
  with pytest.raises(ConfigError, match="bogus"):
    from_dict(dict(d, bogus=1))


@pytest.mark.parametrize("name", configs.names())
def test_every_preset_validates(name):
  cfg = configs.get_preset(name)
  assert validate(cfg) is cfg
  assert cfg.name == name
  assert from_dict(to_dict(cfg)) == cfg


def test_model_config_is_hashable_and_value_equal():
  a = ModelConfig(d_model=64, n_heads=4)
  b = ModelConfig(d_model=64, n_heads=4)
  assert a == b and hash(a) == hash(b)


# ------------------------------------------------------------------ fuzz

_GARBAGE_KEYS = st.sampled_from([
    "model", "model.", ".model", "model.attention", "model.n_layer", "train.lr.x", "x", "",
    "model.attention.window.y", "mesh.data ", " data.paths", "1model.d_model", "model.d-model",
    "model.__class__", "train.__dict__", "Model.d_model"])
_VALUE_TEXT = st.one_of(
    st.integers(-10 ** 6, 10 ** 6).map(str),
    st.integers(-3, 70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "yes", "no", "on", "off", "none", "null", "", " ", ",", "a,b",
                     "1e3", "1e400", "-1e400", "0x10", "1_000", "nan", "inf", "-inf", "2.0",
                     "full", "sliding", "files", "byte", "bpe", "float32", "bfloat16", "dots",
                     "9" * 5000, "٣", "1,2,3", "=", "a=b", "\x00"]),
    st.text(max_size=12),
)


@st.composite
def _override(draw):
  key = draw(st.one_of(st.sampled_from(ALL_KEYS), st.sampled_from(ALL_KEYS), _GARBAGE_KEYS,
                       st.text(max_size=8)))
  value = draw(_VALUE_TEXT)
  return draw(st.sampled_from([f"{key}={value}", f"{key}={value}", key, f" {key} = {value} "]))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_override(), min_size=1, max_size=5))
def test_fuzz_overrides_give_config_or_config_error(overrides):
  try:
    cfg = apply_overrides(BASE, overrides)
  except ConfigError as e:
    assert str(e), "a ConfigError must say what is wrong"
    return
  assert isinstance(cfg, Config)
  assert validate(cfg) is cfg
  assert from_dict(json.loads(json.dumps(to_dict(cfg)))) == cfg
