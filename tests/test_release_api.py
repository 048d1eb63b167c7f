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

# pacsys.device: what a Device is, the DRFs it sends, what it gives and refuses (events written
# canonically, as device_spells_drfs_canonically below explains).
EXPECTED["device_what_it_is"] = [
    ["M:OUTTMP", "M:OUTTMP.READING", "M:OUTTMP", False, False, "Device('M:OUTTMP.READING')"],
    ["m_outtmp", "M:OUTTMP.SETTING", "M:OUTTMP", False, False, "Device('M:OUTTMP.SETTING')"],
    ["M|OUTTMP", "M:OUTTMP.STATUS", "M:OUTTMP", False, False, "Device('M:OUTTMP.STATUS')"],
    ["B:HS23T[0:10]", "B:HS23T.READING[0:10]", "B:HS23T", False, False, "Device('B:HS23T.READING[0:10]')"],
    ["M:OUTTMP.RAW", "M:OUTTMP.READING.RAW", "M:OUTTMP", False, False, "Device('M:OUTTMP.READING.RAW')"],
    [
        "Z:ACLTST.SETTING.SCALED<-FTP",
        "Z:ACLTST.SETTING<-FTP",
        "Z:ACLTST",
        False,
        False,
        "Device('Z:ACLTST.SETTING<-FTP')",
    ],
    ["M:OUTTMP@P,1000", True, True],
    ["M:OUTTMP@Q,500", True, True],
    ["M:OUTTMP@E,2", True, False],
    ["M:OUTTMP@I", True, False],
    ["M:OUTTMP@N", True, False],
    ["M:OUTTMP@U", False, False],
    ["'X'", ["ValueError"]],
    ["'M:OUTTMP@Z'", ["ValueError"]],
    ["''", ["ValueError"]],
    ["'M:OUTTMP.FOO'", ["ValueError"]],
    ["'M:OUTTMP[3:1]'", ["ValueError"]],
    ["42", ["TypeError"]],
    True,
    False,
    True,
    ["AttributeError"],
    ["AttributeError"],
    ["ScalarDevice", "ArrayDevice", "TextDevice"],
]
EXPECTED["device_reads_send_these_drfs"] = [
    ["M:OUTTMP", "read", {}, "M:OUTTMP.READING@I"],
    ["M:OUTTMP", "read", {"field": "raw"}, "M:OUTTMP.READING.RAW@I"],
    ["M:OUTTMP", "read", {"field": "primary", "timeout": 5.0}, "M:OUTTMP.READING.PRIMARY@I"],
    ["M:OUTTMP", "setting", {}, "M:OUTTMP.SETTING@I"],
    ["M:OUTTMP", "setting", {"field": "units"}, "M:OUTTMP.SETTING.UNITS@I"],
    ["M:OUTTMP", "status", {}, "M:OUTTMP.STATUS@I"],
    ["M:OUTTMP", "status", {"field": "on"}, "M:OUTTMP.STATUS.ON@I"],
    ["M:OUTTMP", "status", {"field": "bit_value"}, "M:OUTTMP.STATUS.BIT_VALUE@I"],
    ["M:OUTTMP", "analog_alarm", {}, "M:OUTTMP.ANALOG@I"],
    ["M:OUTTMP", "analog_alarm", {"field": "min"}, "M:OUTTMP.ANALOG.MIN@I"],
    ["M:OUTTMP", "digital_alarm", {}, "M:OUTTMP.DIGITAL@I"],
    ["M:OUTTMP", "digital_alarm", {"field": "mask"}, "M:OUTTMP.DIGITAL.MASK@I"],
    ["M:OUTTMP", "description", {}, "M:OUTTMP.DESCRIPTION@I"],
    ["M:OUTTMP", "get", {}, "M:OUTTMP.READING"],
    ["M:OUTTMP@P,1000", "get", {}, "M:OUTTMP.READING@P,1000"],
    ["M:OUTTMP@P,1000", "read", {}, "M:OUTTMP.READING@I"],
    ["M:OUTTMP", "get", {"prop": "setting"}, "M:OUTTMP.SETTING@I"],
    ["M:OUTTMP", "get", {"prop": "sts", "field": "ready"}, "M:OUTTMP.STATUS.READY@I"],
    ["M:OUTTMP", "get", {"prop": "ANALOG", "field": "max"}, "M:OUTTMP.ANALOG.MAX@I"],
    ["B:HS23T[0:10]", "read", {}, "B:HS23T.READING[0:10]@I"],
    ["B:HS23T[0:10]", "setting", {}, "B:HS23T.SETTING[0:10]@I"],
    ["B:HS23T[0:10]", "get", {"prop": "setting"}, "B:HS23T.SETTING[0:10]@I"],
    ["M:OUTTMP<-FTP", "read", {}, "M:OUTTMP.READING@I<-FTP"],
    ["M:OUTTMP<-FTP", "status", {"field": "on"}, "M:OUTTMP.STATUS.ON@I<-FTP"],
    ["M:OUTTMP.RAW", "read", {}, "M:OUTTMP.READING.RAW@I"],
    ["M:OUTTMP.RAW", "setting", {}, "M:OUTTMP.SETTING.RAW@I"],
    ["M:OUTTMP.RAW", "status", {}, "M:OUTTMP.STATUS.RAW@I"],
    ["M:OUTTMP.RAW", "analog_alarm", {}, "M:OUTTMP.ANALOG.RAW@I"],
    ["M:OUTTMP.UNITS", "status", {}, "M:OUTTMP.STATUS@I"],
    ["M|OUTTMP.ON", "read", {}, "M:OUTTMP.READING@I"],
    ["M:OUTTMP.SETTING@P,1000", "read", {}, "M:OUTTMP.READING@I"],
    ["M:OUTTMP@E,2<-LOGGER:1000:2000", "read", {}, "M:OUTTMP.READING@E,2<-LOGGER:1000:2000"],
    ["M:OUTTMP<-LOGGER:1000:2000", "setting", {}, "M:OUTTMP.SETTING<-LOGGER:1000:2000"],
    ["M:OUTTMP@P,1000<-LOGGERDURATION:3600", "read", {}, "M:OUTTMP.READING@P,1000<-LOGGERDURATION:3600"],
]
EXPECTED["device_refuses_a_field_that_does_not_fit"] = [
    [
        ["ValueError"],
        ["ValueError"],
        ["ValueError"],
        ["ValueError"],
        ["ValueError"],
        ["ValueError"],
        ["ValueError"],
        ["ValueError"],
        ["ValueError"],
        ["ValueError"],
    ],
    [],
    [],
]
EXPECTED["device_values_and_errors"] = [
    72.5,
    50.0,
    ["int", "bool"],  # the whole status as it comes, a one-bit field as a bool
    "Outside temperature",
    ["Reading", 72.5, True, 0],
    ["TypeError"],
    True,
    ["M:BADDEV.READING@I", -42, "Device not found"],
    ["M:NOTSET.READING@I", -1, "No reading configured for M:NOTSET.READING@I"],
    ["M:OUTTMP.ANALOG@I", -13, "No such property for M:OUTTMP"],
    ["M:BADDEV.READING@I", -42, "Device not found"],
]
EXPECTED["device_writes"] = [
    ["M:OUTTMP", "WriteResult", True, None, False, ["M:OUTTMP.SETTING@N", 72.5]],
    ["M:OUTTMP", "WriteResult", True, None, False, ["M:OUTTMP.SETTING.RAW@N", 100]],
    ["M:OUTTMP", "WriteResult", True, None, False, ["M:OUTTMP.SETTING@N", 72.5]],
    ["M|OUTTMP", "WriteResult", True, None, False, ["M:OUTTMP.SETTING@N", 1.0]],
    ["M:OUTTMP.RAW@P,1000", "WriteResult", True, None, False, ["M:OUTTMP.SETTING.RAW@N", 3]],
    ["B:HS23T[0:3]", "WriteResult", False, None, False, ["B:HS23T.SETTING[0:3]@N", [1.0, 2.0, 3.0, 4.0]]],
    ["M:OUTTMP<-FTP", "WriteResult", True, None, False, ["M:OUTTMP.SETTING@N<-FTP", 72.5]],
    ["Z:ACLTST.ANALOG@N", {"minimum": 40, "maximum": 80}],
    ["Z:ACLTST.DIGITAL@N", {"nominal": 1, "mask": 255}],
    [False, False, -1, "Fail", 0],
]
EXPECTED["device_changed_copies"] = [
    ["Device", "B:HS23T.READING[0:10]@P,500<-FTP", True, True],
    ["Device", "B:HS23T.READING[0:10]@E,2<-FTP", True, False],
    ["Device", "B:HS23T.READING[0:10]<-FTP", False, False],
    ["Device", "B:HS23T.READING[2:5]@P,1000<-FTP", True, True],
    ["Device", "B:HS23T.READING[5:]@P,1000<-FTP", True, True],
    ["Device", "B:HS23T.READING[:5]@P,1000<-FTP", True, True],
    ["Device", "B:HS23T.READING[3]@P,1000<-FTP", True, True],
    ["Device", "B:HS23T.READING@P,1000<-FTP", True, True],
    ["Device", "B:HS23T.READING[0:10]@P,1000<-LOGGER:100:200", True, True],
    ["Device", "B:HS23T.READING[0:10]@P,1000<-LIVEDATA", True, True],
    ["Device", "B:HS23T.READING[0:10]@P,1000", True, True],
    ["Device", "M:OUTTMP.READING", False, False],
    ["Device", "M:OUTTMP.READING", False, False],
    ["Device", "B:HS23T.READING[0:10]@P,1000<-FTP", True, True],
    ["ValueError"],
    ["ValueError"],
    ["ValueError"],
    ["ValueError"],
    ["ValueError"],
    [True, True, True, True],
    [["Device", "M:OUTTMP.READING@P,1000<-FTP", True, True], True],
    ["ScalarDevice", "ScalarDevice", "ScalarDevice", "ScalarDevice", "ScalarDevice", "ScalarDevice"],
    ["ArrayDevice", "ArrayDevice", "ArrayDevice", "ArrayDevice", "ArrayDevice", "ArrayDevice"],
    ["TextDevice", "TextDevice", "TextDevice", "TextDevice", "TextDevice", "TextDevice"],
]
EXPECTED["device_scalar_and_text_check_what_they_read"] = [
    ["float", 72.5],
    ["float", 42.0],  # an int, as a float
    ["TypeError"],
    ["TypeError"],
    ["TypeError"],
    ["str", "some text"],
    ["TypeError"],
    ["TypeError"],
]
EXPECTED["device_subscribes"] = [
    ["M:OUTTMP", {"event": "P,1000"}, False, ["M:OUTTMP.READING@P,1000"]],
    ["M:OUTTMP@P,1000", {}, False, ["M:OUTTMP.READING@P,1000"]],
    ["M:OUTTMP@P,1000", {"event": "E,F"}, False, ["M:OUTTMP.READING@E,F"]],
    ["M:OUTTMP", {"prop": "setting", "event": "P,1000"}, False, ["M:OUTTMP.SETTING@P,1000"]],
    ["M:OUTTMP", {"prop": "status", "field": "on", "event": "P,1000"}, False, ["M:OUTTMP.STATUS.ON@P,1000"]],
    ["B:HS23T[0:10]<-FTP", {"event": "P,1000"}, False, ["B:HS23T.READING[0:10]@P,1000<-FTP"]],
    ["M:OUTTMP.RAW@Q,500", {}, False, ["M:OUTTMP.READING.RAW@Q,500"]],
    ["M:OUTTMP", {"event": "I"}, False, ["M:OUTTMP.READING@I"]],
    [72.5],
    [99.0],
    True,
    0,
]
EXPECTED["device_refuses_a_subscription_it_cannot_make"] = [
    [
        ["ValueError", True],
        ["ValueError", True],
        ["ValueError", True],
        ["ValueError", True],
        ["ValueError", True],
        ["ValueError", True],
        ["ValueError", True],
        ["ValueError", True],
        ["TypeError", True],
        ["TypeError", True],
        ["TypeError", True],
        ["TypeError", True],
        "subscribed",
        "subscribed",
        "subscribed",
    ],
    0,
]
EXPECTED["device_awaits_the_next_reading"] = [99.0, 77.0, ["TimeoutError"], True, ["ValueError"], 0]
EXPECTED["device_spells_drfs_canonically"] = [
    "M:OUTTMP.READING@P,1000",
    "M:OUTTMP.READING[]",
    "M:OUTTMP.READING@U",
    "M:OUTTMP.READING[]@P,1000",
    "M:OUTTMP.READING@E,F",
    "M:OUTTMP.READING@P,1000<-LOGGER:1:2",
    "M:OUTTMP.READING@P,100",
]
# an array, a list and a tuple give an array; a scalar and a text are refused
EXPECTED["device_array_gives_numpy_arrays"] = [["ndarray", [1.0, 2.0, 3.0]]] * 3 + [["TypeError"]] * 2
EXPECTED["device_imports_numpy_only_for_an_array"] = ["False", "True"]

# Where this project differs from the release on purpose, the release's answer (see
# docs/supervised.md, "What still differs").
RELEASE_DIFFERS = {
    # its fake handle forgets what it buffered once stopped; ours reads like a real handle
    "combined_reads_what_a_stopped_fake_holds": [2.0],
    # it creates the binary file at its first frame; ours at once, so a bad path stops startup
    "audit_opens_its_binary_file_at_once": False,
    # it sends an event and an extra as written; ours in pacsys.drf's canonical spelling
    "device_spells_drfs_canonically": [
        "M:OUTTMP.READING@p,1000",
        "M:OUTTMP.READING[:]",
        "M:OUTTMP.READING",
        "M:OUTTMP.READING[:]@p,1000",
        "M:OUTTMP.READING@e,0f",
        "M:OUTTMP.READING@p,1000<-logger:1:2",
        "M:OUTTMP.READING@p,10h",
    ],
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
