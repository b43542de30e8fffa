"""jaxlm: functional Flax NNX language models (dense, MoE/UniPool, NSA, spiking) and their training stack."""
from jaxlm import host_env as _host_env

_host_env.quiet_libtpu_without_chips()
_host_env.cuda_plugin_without_gpu()
