"""ops.lif — leaky integrate-and-fire over time with surrogate gradients."""
from ops.lif.api import implementations, lif
from ops.lif.config import LifConfig

__all__ = ["lif", "implementations", "LifConfig"]
