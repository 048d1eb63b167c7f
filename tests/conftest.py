"""Fixtures shared across test modules."""

import pytest
from helpers import Running


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
