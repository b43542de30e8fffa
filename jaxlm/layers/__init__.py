"""Flax NNX layers. Every parameter carries `logical_axes` metadata used by jaxlm.sharding."""
