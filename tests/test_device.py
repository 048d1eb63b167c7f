"""pacsys.device where this project differs from the release on purpose.

What it shares with the release is compared with the release itself in
test_release_api.py (the `device_*` probes); here: a Device needs a backend given to it
(this project opens no default connection), and ArrayDevice says so when numpy is missing.
"""

from __future__ import annotations

import sys

import pytest

from pacsys.device import ArrayDevice, Device, ScalarDevice
from pacsys.testing import FakeBackend
from pacsys.types import ValueType


@pytest.fixture
def fake():
    fake = FakeBackend()
    fake.set_reading("M:OUTTMP", 72.5)
    fake.set_reading("B:HS23T", [1.0, 2.0], value_type=ValueType.SCALAR_ARRAY)
    return fake


def test_a_device_without_a_backend_says_how_to_give_one(fake):
    dev = ScalarDevice("M:OUTTMP")
    calls = [dev.read, dev.setting, dev.get, lambda: dev.write(1.0), lambda: dev.subscribe(event="P,1000")]
    for call in calls:
        with pytest.raises(RuntimeError, match=r"ScalarDevice\('M:OUTTMP.READING'\) has no backend.*with_backend"):
            call()
    assert fake.reads == [] and fake.writes == []
    assert dev.with_backend(fake).read() == 72.5


def test_array_device_without_numpy_says_what_to_do(fake, monkeypatch):
    monkeypatch.setitem(sys.modules, "numpy", None)  # `import numpy` fails now, installed or not
    with pytest.raises(ImportError, match=r"numpy is not installed \(pip install numpy\)") as raised:
        ArrayDevice("B:HS23T", backend=fake).read()
    assert "Device('B:HS23T.READING').read() gives the value as a list" in str(raised.value)
    with pytest.raises(TypeError, match=r"Expected array from M:OUTTMP.READING, got float"):
        ArrayDevice("M:OUTTMP", backend=fake).read()  # what it read is checked first, numpy or not
    assert Device("B:HS23T", backend=fake).read() == [1.0, 2.0]
