"""jaxlm: functional Flax NNX language models (dense, MoE/UniPool, NSA, spiking) and their training stack."""
