"""Every equation of a jaxpr, nested ones included (scan bodies, remat, custom_vjp, pjit...).

jax.core.jaxprs_in_params is not public in every jax we support (0.10 and 0.11)."""
from __future__ import annotations

from typing import Iterator


def sub_jaxprs(value) -> Iterator:
  """The jaxprs held by one equation parameter (a Jaxpr, ClosedJaxpr or sequence of them)."""
  if hasattr(value, "eqns"):
    yield value
  elif hasattr(value, "jaxpr") and hasattr(value.jaxpr, "eqns"):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from sub_jaxprs(v)


def all_eqns(jaxpr, inside: tuple = ()) -> Iterator[tuple]:
  """(eqn, names of the primitives it is nested in, outermost first) for every equation."""
  for eqn in jaxpr.eqns:
    yield eqn, inside
    for value in eqn.params.values():
      for sub in sub_jaxprs(value):
        yield from all_eqns(sub, inside + (eqn.primitive.name,))
