"""The release's public types, subscription handles, fakes, audit log and DRF helpers, side by side.

`release_api_probes.py` runs the same probes under this project's interpreter and under the
pacsys 0.3.0 release's venv. Each probe's observations are checked against what is written
here, for this project and for the release: where they agree the release must say the same;
where this project differs on purpose (`RELEASE_DIFFERS`, listed with its reason in
docs/supervised.md) the release's own answer is pinned too, so a change on either side shows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from release_api_probes import NEEDS_NUMPY, PROBES

ROOT = Path(__file__).resolve().parent.parent
PROBE_SCRIPT = Path(__file__).resolve().parent / "release_api_probes.py"
VE = "ValueError"

EXPECTED = {
    "combined_refuses_no_subscriptions": [VE, True],
    # stopped: no, (exc None), one of two stopped: no, both: yes; exc is the error; a with block stops both
    "combined_stopped_exc_and_context": [False, True, False, True, True, False, True, True],
    # (drf, value, which handle), naive timestamps read as UTC; a second look finds nothing
    "combined_drains_in_time_order": [[["M:OUTTMP", 20.0, 0], ["G:AMANDA", 10.0, 1], ["M:OUTTMP", 30.0, 0]], []],
    "combined_raises_a_handles_error": [["RuntimeError", "boom"], ["RuntimeError", "boom"]],
    "combined_blocks_until_the_subscriptions_end": [[1.0, 2.0], [99.0]],
    "combined_ends_on_timeout_and_on_stop": [[], True, [], True],
    "combined_raises_an_error_that_comes_while_waiting": [["RuntimeError", "late"], True],
    "combined_reads_what_a_stopped_fake_holds": [1.0, 2.0],
    "buffered_delivers_then_ends": [[False, None], True, [1.0, 2.0], True],
    "buffered_raises_its_first_error_after_its_readings": [
        ["RuntimeError", "first"],
        [1.0, 2.0],
        True,
        "RuntimeError",
        "first",
        ["RuntimeError", "immediate"],
    ],
    "buffered_keeps_the_oldest_when_full": [[0.0, 1.0, 2.0], 2, 1],
    "buffered_timeouts": [[1.0, 2.0], [], True, [], True],
    "buffered_properties": [[1, 2, 3], "RuntimeError", True],
    "buffered_wakes_a_waiting_reader": [
        ["stop", False, [], []],
        ["error", False, [], ["injected"]],
        ["data", False, [float(i) for i in range(20)], []],
    ],
    "buffered_subclass_as_release_backends_write_it": [[1, 2], True, True, [5.0]],
    "fake_tracks_its_subscriptions": [[0, 1, 0, 2, 0, 0, True], [0, 1]],
    "fake_error_reaches_on_error_of_a_buffered_subscription": [1, True, True, True, 0],
    "fake_write_replaces_the_value_for_every_event": [72.5, 72.5, 72.5, 73.5, 72.5, 73.0, 72.5, 72.5],
    "fake_shifts_float_arrays": [[2.0, 3.0, 4.0], [1.0, 2.0, 3.0], [1, 2, 3], [1.0, 2.0, 3.0]],
    "fake_status_names": [True, True, True],
    "audit_counts_entries_to_its_flush": [[1, 2, 0, 1], 1, VE],
    "audit_encodes_frame_lengths": ["00", "05", "7f", "8001", "ac02", "ffffffff07", "808080808020"],
    "audit_opens_its_binary_file_at_once": True,
}

# (what the JSON has, what from_dict gives back: drf, facility, error, message, verified, skipped, attempts, readback)
_WRITE_RESULTS = [
    ({"drf": "Z:ACLTST", "facility_code": 0, "error_code": 0}, [0, 0, None, None, False, 0, None], True),
    (
        {"drf": "Z:ACLTST", "facility_code": 0, "error_code": -1, "message": "Permission denied"},
        [0, -1, "Permission denied", None, False, 0, None],
        False,
    ),
    (
        {"drf": "Z:ACLTST", "facility_code": 17, "error_code": -17, "message": "denied"},
        [17, -17, "denied", None, False, 0, None],
        False,
    ),
    (
        {"drf": "Z:ACLTST", "facility_code": 0, "error_code": 0, "verified": True, "skipped": True, "attempts": 3},
        [0, 0, None, True, True, 3, None],
        True,
    ),
    (
        {"drf": "Z:ACLTST", "facility_code": 0, "error_code": 0, "verified": False, "readback": 72.5, "attempts": 2},
        [0, 0, None, False, False, 2, 72.5],
        True,
    ),
    (
        {
            "drf": "Z:ACLTST",
            "facility_code": 0,
            "error_code": 0,
            "verified": True,
            "readback": "AQI=",
            "readback_type": "raw",
        },
        [0, 0, None, True, False, 0, "0102"],
        True,
    ),
    (
        {"drf": "Z:ACLTST", "facility_code": 0, "error_code": 0, "verified": True, "readback": "text"},
        [0, 0, None, True, False, 0, "text"],
        True,
    ),
    (
        {"drf": "Z:ACLTST", "facility_code": 0, "error_code": 0, "verified": True, "readback": [1.0, 2.0]},
        [0, 0, None, True, False, 0, [1.0, 2.0]],
        True,
    ),
]
EXPECTED["write_result_round_trips"] = [
    row for data, fields, ok in _WRITE_RESULTS for row in ([data, ["Z:ACLTST", *fields]], [True, ok, ok])
]

# name: (get_device_name, prepare_for_write); a DRF, another name passed on as written, or ValueError
_DRF_UTILS = {
    "M:OUTTMP": ("M:OUTTMP", "M:OUTTMP.SETTING@N"),
    "m_outtmp.setting@p,1000": ("M:OUTTMP", "M:OUTTMP.SETTING@N"),
    "B:HS23T[0:10]@p,1000": ("B:HS23T", "B:HS23T.SETTING[0:10]@N"),
    "G:AMANDA<-LOGGER": ("G:AMANDA", "G:AMANDA.SETTING@N<-LOGGER"),
    "M|OUTTMP": ("M:OUTTMP", "M:OUTTMP.CONTROL@N"),
    "Z:ACLTST.STATUS": ("Z:ACLTST", "Z:ACLTST.CONTROL@N"),
    "hello world": ("hello world", "hello world@N"),
    "HELLO": ("HELLO", "HELLO@N"),
    "1234": ("1234", "1234@N"),
    "Mx:OUT": ("Mx:OUT", "Mx:OUT@N"),
    "dev:pv_name": ("dev:pv_name", "dev:pv_name@N"),
    "dev:pv.VAL@p,1000": ("dev:pv", "dev:pv.VAL@N"),
    "Z:ACL TST": ("Z:ACL TST", "Z:ACL TST@N"),
    "M:OUTTMP extra": ("M:OUTTMP extra", "M:OUTTMP extra@N"),
    "XF:31IDA-OP{Tbl-Ax:X1}Mtr": ("XF:31IDA-OP{Tbl-Ax:X1}Mtr", "XF:31IDA-OP{Tbl-Ax:X1}Mtr@N"),
    "XF:31IDA-OP{Tbl-Ax:X1}Mtr.RBV@I": ("XF:31IDA-OP{Tbl-Ax:X1}Mtr", "XF:31IDA-OP{Tbl-Ax:X1}Mtr.RBV@N"),
    "hello<-LOGGER": ("hello", "hello@N<-LOGGER"),
    "M:OUT\x00TMP": ("M:OUT\x00TMP", "M:OUT\x00TMP@N"),
    **{bad: (VE, VE) for bad in ("", "  ", "x", "AB", "M:", "M:OUTTMP.FOO", "M:OUTTMP@X", "M_OUTTMP.")},
    **{bad: (VE, VE) for bad in ("M:OUTTMP<-FOO", "abc@zz", "M:OUTTMP@s,M:OTHER,1,value,=")},
}
EXPECTED["drf_utils_on_drfs_and_other_names"] = [
    [name, ["returned", got] if got != VE else [VE], ["returned", write] if write != VE else [VE]]
    for name, (got, write) in _DRF_UTILS.items()
]

# Where this project differs from the release on purpose, the release's answer (see
# docs/supervised.md, "What still differs").
RELEASE_DIFFERS = {
    # its fake handle forgets what it buffered once stopped; ours reads like a real handle
    "combined_reads_what_a_stopped_fake_holds": [2.0],
    # it creates the binary file at its first frame; ours at once, so a bad path stops startup
    "audit_opens_its_binary_file_at_once": False,
}


def _run(python: str, *args: str) -> dict:
    done = subprocess.run([python, *args], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def ours() -> dict:
    plain = [name for name in PROBES if name not in NEEDS_NUMPY]
    seen = _run(sys.executable, str(PROBE_SCRIPT), *plain)
    assert seen.pop("__pacsys__") == str(ROOT / "pacsys")
    # numpy is not a dependency of this project; the release's venv has it
    from release_venv import release_python

    with_numpy = _run(str(release_python()), "-I", str(PROBE_SCRIPT), "--root", str(ROOT), *NEEDS_NUMPY)
    assert with_numpy.pop("__pacsys__") == str(ROOT / "pacsys")
    return seen | with_numpy


@pytest.fixture(scope="module")
def release() -> dict:
    from release_venv import release_python

    seen = _run(str(release_python()), "-I", str(PROBE_SCRIPT))
    assert "site-packages" in seen.pop("__pacsys__")
    return seen


def test_every_probe_has_its_expectation():
    assert set(EXPECTED) == set(PROBES)


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_ours(ours, probe):
    assert ours[probe] == EXPECTED[probe]


@pytest.mark.parametrize("probe", sorted(PROBES))
def test_the_release(release, probe):
    assert release[probe] == RELEASE_DIFFERS.get(probe, EXPECTED[probe])
