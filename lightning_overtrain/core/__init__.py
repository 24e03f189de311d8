"""The monitor's core: a monitored run's life in no particular training framework.

Front ends (the Lightning callback, Fabric, the Hugging Face ``Trainer``, a plain
loop) hand :class:`MonitorCore` a :class:`Host` and carry out its decisions.
"""

from lightning_overtrain.core.host import Host, RunHandle
from lightning_overtrain.core.monitor_core import MonitorCore
from lightning_overtrain.engine.collectives import Collectives

__all__ = ["Collectives", "Host", "MonitorCore", "RunHandle"]
