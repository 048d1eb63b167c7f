"""The simulated backend: ACNET devices without a network, deterministic (described in docs/sim.md).

One module per idea: `table` (the TOML device table and its checks), `noise` (deterministic noise),
`values` (value checks shared by the table and writes), `device` (a device's live state),
`properties` (what a DRF reads), `writes` (what a setting changes), `ticker` (events and periodic
delivery) and `backend` (`SimBackend`, tying them together).
"""

from .backend import SimBackend
from .table import DEFAULT_PERIOD_US, MIN_PERIOD_US, DeviceFamily, DeviceSpec, DeviceTable
from .ticker import CLOCK_EVENT_PERIODS_US, DEFAULT_CLOCK_EVENT_PERIOD_US, STATE_EVENT_PERIOD_US

__all__ = [
    "CLOCK_EVENT_PERIODS_US",
    "DEFAULT_CLOCK_EVENT_PERIOD_US",
    "DEFAULT_PERIOD_US",
    "MIN_PERIOD_US",
    "STATE_EVENT_PERIOD_US",
    "DeviceFamily",
    "DeviceSpec",
    "DeviceTable",
    "SimBackend",
]
