"""Functional boundary of NNX models: params are plain nested dicts of arrays.

    fm = build(cfg.model)
    params = fm.init(jax.random.key(0))         # pure dict pytree
    logits, _ = fm.apply(params, tokens)        # pure function, jit/grad friendly
    axes = fm.logical_axes                      # same tree, tuples of logical axis names
    cache = fm.init_cache(batch, max_len)       # decoding state of this model kind

model.kind picks the module in MODEL_MODULES; each such module defines the model class named
there, `init_cache(cfg, batch, max_len, dtype=None)`, CACHE_AXES and `head_param_keys(cfg)`.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, Callable

import jax
from flax import nnx

from jaxlm.config import ModelConfig


# model.kind -> (module, class name)
MODEL_MODULES = {
    "transformer": ("jaxlm.models.transformer", "Transformer"),
    "symboliclight": ("jaxlm.models.symboliclight", "SymbolicLight"),
}


def model_module(kind: str):
  """The module implementing model.kind (its model class, init_cache and CACHE_AXES)."""
  if kind not in MODEL_MODULES:
    raise ValueError(f"unknown model.kind {kind!r}; choose from {tuple(MODEL_MODULES)}")
  return importlib.import_module(MODEL_MODULES[kind][0])


def _is_var(x):
  return isinstance(x, nnx.Variable)


# eq=False: hashed by identity (build() is cached), so it can be a static jit argument.
@dataclasses.dataclass(frozen=True, eq=False)
class FunctionalModel:
  cfg: ModelConfig
  constructor: Callable[..., nnx.Module]
  graphdef: Any
  abstract_state: Any  # nnx.State of ShapeDtypeStruct-valued Params with metadata

  def init(self, key) -> dict:
    model = self.constructor(self.cfg, rngs=nnx.Rngs(params=key))
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))

  @property
  def param_shapes(self) -> dict:
    return nnx.to_pure_dict(self.abstract_state)

  @property
  def logical_axes(self) -> dict:
    axes = jax.tree.map(lambda v: tuple(v.get_metadata()["logical_axes"]), self.abstract_state,
                        is_leaf=_is_var)
    return nnx.to_pure_dict(axes) if not isinstance(axes, dict) else axes

  def module(self, params: dict) -> nnx.Module:
    state = jax.tree.map(lambda v: v, self.abstract_state, is_leaf=lambda x: False)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(self.graphdef, state)

  def apply(self, params: dict, tokens, **kwargs):
    return self.module(params)(tokens, **kwargs)

  def init_cache(self, batch: int, max_len: int, dtype=None):
    """Empty decoding cache of this model kind (see its module's init_cache)."""
    return model_module(self.cfg.kind).init_cache(self.cfg, batch, max_len, dtype)

  @property
  def cache_axes(self) -> dict:
    """Logical axes of init_cache's entries."""
    mod = model_module(self.cfg.kind)
    axes = mod.cache_axes(self.cfg) if hasattr(mod, "cache_axes") else mod.CACHE_AXES
    shapes = jax.eval_shape(lambda: self.init_cache(1, 1))
    return {k: axes[k] for k in shapes}

  @property
  def head_param_keys(self) -> tuple:
    """Top-level params keys the output head (the model's to_logits) reads."""
    return model_module(self.cfg.kind).head_param_keys(self.cfg)

  def for_decode(self, params: dict):
    """(model, params) for a loop of decode steps; call it once, outside the loop. A scanned
    model whose decode unrolls (model.decode_unroll) becomes its unrolled twin, its layers'
    params unstacked here: inside each step XLA copies the layers' weights out of the stack
    again (nsa_1b, H200 compile of a 4-step loop: 3 weight copies per layer and step, about
    1.1 GB written a step). The cache layout is the same; the copy of the params costs their
    size in memory for the loop's duration."""
    if not (self.cfg.scan_layers and self.cfg.decode_unroll):
      return self, params
    from jaxlm.models.layer_layout import convert_layer_layout
    return (build(dataclasses.replace(self.cfg, scan_layers=False)),
            convert_layer_layout(params, scanned=False))

  def num_params(self) -> int:
    return sum(int(x.size) for x in jax.tree.leaves(self.param_shapes))


@functools.lru_cache(maxsize=16)
def build(cfg: ModelConfig) -> FunctionalModel:
  ctor = getattr(model_module(cfg.kind), MODEL_MODULES[cfg.kind][1])
  abstract = nnx.eval_shape(lambda: ctor(cfg, rngs=nnx.Rngs(params=0)))
  graphdef, state = nnx.split(abstract, nnx.Param)
  return FunctionalModel(cfg, ctor, graphdef, state)
