"""Capture: discovery, hooks, on-device accumulation, the Monitor and reference profiles.

The only part of bnwatch's core stack that imports torch.
"""

from bnwatch.capture.discovery import BatchNormLayer, discover
from bnwatch.capture.monitor import Monitor, MonitorStats
from bnwatch.capture.profile import profile

__all__ = ["BatchNormLayer", "Monitor", "MonitorStats", "discover", "profile"]
