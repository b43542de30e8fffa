"""ops — standalone JAX kernels (attention, NSA, grouped matmul, scan, LIF).

Imports only jax and numpy. Each op is a subpackage with one public function
taking ``implementation=`` (see ``ops._backend``).
"""
