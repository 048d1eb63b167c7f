"""Fixtures shared across test modules."""

import pytest
from helpers import Running
from processes import daq, supervisor  # noqa: F401 - fixtures: a pacsys-supervisor process, a client of it


@pytest.fixture
def running():
    made = []

    def make(**kwargs):
        r = Running(**kwargs)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()
