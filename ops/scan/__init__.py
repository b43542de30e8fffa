"""ops.scan — chunked linear recurrence h_t = a_t * h_{t-1} + b_t over time."""
from ops.scan.api import implementations, linear_scan
from ops.scan.config import ScanConfig

__all__ = ["linear_scan", "implementations", "ScanConfig"]
