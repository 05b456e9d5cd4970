"""Capture: discovery, hooks, on-device accumulation, the Monitor and reference profiles.

The only part of bnwatch's core stack that imports torch.
"""

from bnwatch.capture.discovery import BatchNormLayer, discover
from bnwatch.capture.monitor import KeptInputs, Monitor, MonitorStats
from bnwatch.capture.profile import profile

__all__ = ["BatchNormLayer", "KeptInputs", "Monitor", "MonitorStats", "discover", "profile"]
