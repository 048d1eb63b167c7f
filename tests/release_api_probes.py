"""Probes of the public API shared with the pacsys release, run under either package.

    python release_api_probes.py [NAME ...]

prints one JSON object: what each probe observed, and where `pacsys` came from.
tests/test_release_api.py runs it under the release's venv (`python -I`: the release's
`pacsys`) and under this project's interpreter, and compares. A probe returns plain data
(lists, numbers, strings), never objects, so that both runs can be compared as JSON.
Probes that need numpy say so (`NEEDS_NUMPY`): this project does not depend on it, so they
run under the release's interpreter with this project's root first on the path.
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

PROBES = {}
NEEDS_NUMPY = {"fake_shifts_float_arrays", "device_array_gives_numpy_arrays", "device_imports_numpy_only_for_an_array"}


def probe(fn):
    PROBES[fn.__name__] = fn
    return fn


def _raised(fn):
    """The name of the exception `fn()` raised (ValueError for any subclass of it), or its result."""
    try:
        return ["returned", fn()]
    except ValueError:
        return ["ValueError"]  # DRFError is one; the messages differ between the two
    except Exception as exc:
        return [type(exc).__name__, str(exc)]


def _values(pairs):
    return [reading.value for reading, _ in pairs]


# -- CombinedStream ---------------------------------------------------------------------------


@probe
def combined_refuses_no_subscriptions():
    from pacsys.types import CombinedStream

    try:
        CombinedStream([])
    except ValueError as exc:
        return ["ValueError", "empty" in str(exc)]
    return ["no error"]


@probe
def combined_stopped_exc_and_context():
    from pacsys.testing import FakeBackend
    from pacsys.types import CombinedStream

    fake = FakeBackend()
    h1, h2 = fake.subscribe(["M:OUTTMP"]), fake.subscribe(["G:AMANDA"])
    cs = CombinedStream([h1, h2])
    seen = [cs.stopped, cs.exc is None]
    h1.stop()
    seen.append(cs.stopped)
    h2.stop()
    seen.append(cs.stopped)
    fake = FakeBackend()
    h1, h2 = fake.subscribe(["M:OUTTMP"]), fake.subscribe(["G:AMANDA"])
    err = RuntimeError("boom")
    fake.emit_error(err)
    seen.append(CombinedStream([h1, h2]).exc is err)
    h3, h4 = fake.subscribe(["M:OUTTMP"]), fake.subscribe(["G:AMANDA"])
    with CombinedStream([h3, h4]) as cs:
        seen.append(cs.stopped)
    seen += [h3.stopped, h4.stopped]
    return seen


@probe
def combined_drains_in_time_order():
    from pacsys.testing import FakeBackend
    from pacsys.types import CombinedStream

    fake = FakeBackend()
    h1, h2 = fake.subscribe(["M:OUTTMP"]), fake.subscribe(["G:AMANDA"])
    fake.emit_reading("G:AMANDA", 10.0, timestamp=datetime(2025, 1, 1, 0, 0, 2))  # naive: read as UTC
    fake.emit_reading("M:OUTTMP", 20.0, timestamp=datetime(2025, 1, 1, 0, 0, 1, tzinfo=UTC))
    fake.emit_reading("M:OUTTMP", 30.0, timestamp=datetime(2025, 1, 1, 0, 0, 3))
    pairs = list(CombinedStream([h1, h2]).readings(timeout=0))
    empty = list(CombinedStream([h1, h2]).readings(timeout=0))
    return [[r.drf, r.value, [h1, h2].index(h)] for r, h in pairs], empty


@probe
def combined_raises_a_handles_error():
    from pacsys.testing import FakeBackend
    from pacsys.types import CombinedStream

    fake = FakeBackend()
    h1 = fake.subscribe(["M:OUTTMP"])
    fake.emit_error(RuntimeError("boom"))
    return [
        _raised(lambda: list(CombinedStream([h1]).readings(timeout=0))),
        _raised(lambda: list(CombinedStream([h1]).readings(timeout=2))),
    ]


@probe
def combined_blocks_until_the_subscriptions_end():
    from pacsys.testing import FakeBackend
    from pacsys.types import CombinedStream

    fake = FakeBackend()
    h1, h2 = fake.subscribe(["M:OUTTMP"]), fake.subscribe(["G:AMANDA"])

    def emit_then_stop():
        fake.emit_reading("M:OUTTMP", 1.0)
        fake.emit_reading("G:AMANDA", 2.0)
        h1.stop()
        h2.stop()

    threading.Timer(0.05, emit_then_stop).start()
    got = sorted(_values(CombinedStream([h1, h2]).readings(timeout=10)))
    fake = FakeBackend()
    h1 = fake.subscribe(["M:OUTTMP"])
    threading.Timer(0.05, lambda: (fake.emit_reading("M:OUTTMP", 99.0), h1.stop())).start()
    unlimited = _values(CombinedStream([h1]).readings(timeout=None))
    return got, unlimited


@probe
def combined_ends_on_timeout_and_on_stop():
    from pacsys.testing import FakeBackend
    from pacsys.types import CombinedStream

    fake = FakeBackend()
    h1 = fake.subscribe(["M:OUTTMP"])
    start = time.monotonic()
    quiet = list(CombinedStream([h1]).readings(timeout=0.2))
    waited = time.monotonic() - start
    cs = CombinedStream([fake.subscribe(["G:AMANDA"])])
    threading.Timer(0.1, cs.stop).start()
    start = time.monotonic()
    stopped = list(cs.readings(timeout=30))
    return [quiet, 0.15 <= waited < 5, stopped, time.monotonic() - start < 10]


@probe
def combined_raises_an_error_that_comes_while_waiting():
    from pacsys.testing import FakeBackend
    from pacsys.types import CombinedStream

    fake = FakeBackend()
    h1 = fake.subscribe(["M:OUTTMP"])
    err = RuntimeError("late")
    cs = CombinedStream([h1])
    threading.Timer(0.05, lambda: fake.emit_error(err)).start()
    return [_raised(lambda: list(cs.readings(timeout=10))), cs.exc is err]


@probe
def combined_reads_what_a_stopped_fake_holds():
    # A difference: the release's fake handle forgets its buffer once stopped; here the
    # readings a handle buffered before it was stopped are still read, as from a real handle.
    from pacsys.testing import FakeBackend
    from pacsys.types import CombinedStream

    fake = FakeBackend()
    h1, h2 = fake.subscribe(["M:OUTTMP"]), fake.subscribe(["G:AMANDA"])
    fake.emit_reading("M:OUTTMP", 1.0, timestamp=datetime(2025, 1, 1, 0, 0, 1))
    fake.emit_reading("G:AMANDA", 2.0, timestamp=datetime(2025, 1, 1, 0, 0, 2))
    h1.stop()
    return _values(CombinedStream([h1, h2]).readings(timeout=0))


# -- WriteResult ------------------------------------------------------------------------------


@probe
def write_result_round_trips():
    from pacsys.types import WriteResult

    results = [
        WriteResult(drf="Z:ACLTST"),
        WriteResult(drf="Z:ACLTST", error_code=-1, message="Permission denied"),
        WriteResult(drf="Z:ACLTST", facility_code=17, error_code=-17, message="denied"),
        WriteResult(drf="Z:ACLTST", verified=True, skipped=True, attempts=3),
        WriteResult(drf="Z:ACLTST", verified=False, readback=72.5, attempts=2),
        WriteResult(drf="Z:ACLTST", verified=True, readback=b"\x01\x02"),
        WriteResult(drf="Z:ACLTST", verified=True, readback="text"),
        WriteResult(drf="Z:ACLTST", verified=True, readback=[1.0, 2.0]),
    ]
    seen = []
    for result in results:
        data = json.loads(json.dumps(result.to_dict()))
        back = WriteResult.from_dict(data)
        readback = back.readback.hex() if isinstance(back.readback, bytes) else back.readback
        fields = [back.drf, back.facility_code, back.error_code, back.message, back.verified, back.skipped]
        seen.append([data, [*fields, back.attempts, list(readback) if isinstance(readback, tuple) else readback]])
        seen.append([back == result, back.ok, back.success])
    return seen


# -- BufferedSubscriptionHandle ---------------------------------------------------------------


def _reading(value):
    from pacsys.types import Reading, ValueType

    return Reading(drf="M:OUTTMP", value_type=ValueType.SCALAR, value=value)


def _buffered():
    from pacsys.backends._subscription import BufferedSubscriptionHandle

    return BufferedSubscriptionHandle()


@probe
def buffered_delivers_then_ends():
    h = _buffered()
    seen = [h.stopped, h.exc]
    h._dispatch(_reading(1.0))
    h._dispatch(_reading(2.0))
    h._signal_stop()
    h._signal_stop()
    h._dispatch(_reading(3.0))
    pairs = list(h.readings())
    return [seen, h.stopped, _values(pairs), all(handle is h for _, handle in pairs)]


@probe
def buffered_raises_its_first_error_after_its_readings():
    h = _buffered()
    h._dispatch(_reading(1.0))
    h._dispatch(_reading(2.0))
    h._signal_error(RuntimeError("first"))
    h._signal_error(ValueError("second"))
    got = []

    def read():
        for reading, _ in h.readings():
            got.append(reading.value)

    empty = _buffered()
    empty._signal_error(RuntimeError("immediate"))
    return [_raised(read), got, h.stopped, type(h.exc).__name__, str(h.exc), _raised(lambda: list(empty.readings()))]


@probe
def buffered_keeps_the_oldest_when_full():
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    log = logging.getLogger("pacsys.backends._subscription")
    log.addHandler(handler)
    try:
        h = _buffered()
        h._maxsize = 3
        for i in range(5):
            h._dispatch(_reading(float(i)))
        h._signal_stop()
        logged = len(records)  # one line for the first drop; the second is within the same interval
    finally:
        log.removeHandler(handler)
    return [_values(h.readings()), h.dropped, logged]


@probe
def buffered_timeouts():
    h = _buffered()
    h._dispatch(_reading(1.0))
    h._dispatch(_reading(2.0))
    drained = _values(h.readings(timeout=0))
    start = time.monotonic()
    nothing = list(h.readings(timeout=0))
    fast = time.monotonic() - start < 2  # it does not wait: generous for a loaded machine
    start = time.monotonic()
    waited = list(h.readings(timeout=0.1))
    elapsed = time.monotonic() - start
    return [drained, nothing, fast, waited, 0.05 <= elapsed < 5]


@probe
def buffered_properties():
    h = _buffered()
    h._ref_ids = [1, 2, 3]
    ids = h.ref_ids
    ids.append(99)
    guarded = _buffered()
    guarded._is_callback_mode = True
    refused = _raised(lambda: list(guarded.readings()))
    return [h.ref_ids, refused[0], "callback" in refused[1]]


@probe
def buffered_wakes_a_waiting_reader():
    seen = []
    for end in ("stop", "error", "data"):
        h = _buffered()
        got, raised = [], []

        def consume(h=h, got=got, raised=raised):
            try:
                for reading, _ in h.readings(timeout=10):
                    got.append(reading.value)
            except RuntimeError as exc:
                raised.append(str(exc))

        reader = threading.Thread(target=consume)
        reader.start()
        time.sleep(0.05)  # the reader is waiting (the outcome is the same if it is not yet)
        if end == "error":
            h._signal_error(RuntimeError("injected"))
        else:
            if end == "data":
                for i in range(20):
                    h._dispatch(_reading(float(i)))
            h._signal_stop()
        reader.join(timeout=10)
        seen.append([end, reader.is_alive(), got, raised])
    return seen


@probe
def buffered_subclass_as_release_backends_write_it():
    from pacsys.backends._subscription import BufferedSubscriptionHandle

    class Handle(BufferedSubscriptionHandle):
        def __init__(self, drfs):
            super().__init__()
            self._drfs = drfs
            self._ref_ids = list(range(1, len(drfs) + 1))
            self.removed = False

        def stop(self):
            if not self._stopped:
                self.removed = True
                self._signal_stop()

    h = Handle(["M:OUTTMP", "G:AMANDA"])
    with h:
        h._dispatch(_reading(5.0))
    return [h.ref_ids, h.removed, h.stopped, _values(h.readings(timeout=0))]


# -- pacsys.testing ---------------------------------------------------------------------------


@probe
def fake_tracks_its_subscriptions():
    from pacsys.testing import FakeBackend

    fake = FakeBackend()
    counts = [len(fake._subscriptions)]
    h1 = fake.subscribe(["M:OUTTMP", "G:AMANDA"])
    counts.append(len(fake._subscriptions))
    h1.stop()
    counts.append(len(fake._subscriptions))
    fake.subscribe(["M:OUTTMP"])
    fake.subscribe(["G:AMANDA"])
    counts.append(len(fake._subscriptions))
    fake.stop_streaming()
    counts.append(len(fake._subscriptions))
    h2 = fake.subscribe(["M:OUTTMP"])
    fake.reset()
    counts += [len(fake._subscriptions), h2.stopped]
    return [counts, h1.ref_ids]


@probe
def fake_error_reaches_on_error_of_a_buffered_subscription():
    from pacsys.testing import FakeBackend

    fake = FakeBackend()
    errors = []
    handle = fake.subscribe(["M:OUTTMP"], on_error=lambda exc, h: errors.append((exc, h)))
    err = ConnectionError("Simulated disconnect")
    fake.emit_error(err)
    return [len(errors), errors[0][0] is err, errors[0][1] is handle, handle.exc is err, len(fake._subscriptions)]


@probe
def fake_write_replaces_the_value_for_every_event():
    from pacsys.testing import FakeBackend

    cases = [
        ("M:OUTTMP.SETTING@p,1000", "M:OUTTMP.SETTING@N", "M:OUTTMP.SETTING@p,1000"),
        ("M:OUTTMP.SETTING@I", "M:OUTTMP.SETTING@N", "M:OUTTMP.SETTING@I"),
        ("M:OUTTMP.SETTING@I", "M:OUTTMP.SETTING@I", "M:OUTTMP.SETTING@I"),
        ("M:OUTTMP.SETTING@I", "M:OUTTMP.SETTING@I", "M:OUTTMP.SETTING@p,1000"),
        ("M:OUTTMP.SETTING", "M:OUTTMP.SETTING@p,1000", "M:OUTTMP.SETTING@p,1000"),
        ("M:OUTTMP.SETTING", "M:OUTTMP.SETTING@p,1000", "M:OUTTMP.SETTING@p,500"),
        ("M:OUTTMP.SETTING@p,1000", "M:OUTTMP.SETTING", "M:OUTTMP.SETTING@p,1000"),
    ]
    seen = []
    for set_drf, write_drf, read_drf in cases:
        fake = FakeBackend()
        fake.set_reading(set_drf, 50.0)
        fake.write(write_drf, 72.5)
        seen.append(fake.read(read_drf))
    fake = FakeBackend()
    fake.set_error("M:OUTTMP.SETTING@I", -1, "Offline")
    fake.write("M:OUTTMP.SETTING@I", 72.5)
    seen.append(fake.read("M:OUTTMP.SETTING@I"))
    return seen


@probe
def fake_shifts_float_arrays():
    import numpy as np

    from pacsys.testing import FakeBackend
    from pacsys.types import ValueType

    fake = FakeBackend()
    floats = np.array([1.0, 2.0, 3.0])
    fake.set_reading("M:OUTTMP", floats, value_type=ValueType.SCALAR_ARRAY)
    fake.set_reading("B:INTS", np.array([1, 2, 3]), value_type=ValueType.SCALAR_ARRAY)
    reads = [fake.read("M:OUTTMP@p,1000"), floats, fake.read("B:INTS@p,1000"), fake.read("M:OUTTMP@I")]
    return [np.asarray(value).tolist() for value in reads]


@probe
def fake_status_names():
    from pacsys.acnet.errors import ERR_NOPROP, ERR_OK, ERR_RETRY, FACILITY_ACNET, FACILITY_DBM
    from pacsys.testing import FakeBackend

    fake = FakeBackend()
    missing = fake.get("M:OUTTMP")
    fake.set_reading("M:OUTTMP", 72.5)
    no_property = fake.get("M:OUTTMP.SETTING")
    good = fake.get("M:OUTTMP")
    return [
        (missing.facility_code, missing.error_code) == (FACILITY_ACNET, ERR_RETRY),
        (no_property.facility_code, no_property.error_code) == (FACILITY_DBM, ERR_NOPROP),
        good.error_code == ERR_OK,
    ]


# -- AuditLog ---------------------------------------------------------------------------------


def _audit_request(audit, raw_request=None):
    from pacsys.supervised._policies import PolicyDecision, RequestContext

    ctx = RequestContext(
        drfs=["M:OUTTMP"], rpc_method="Read", peer="ipv4:10.0.0.1:1", metadata={}, values=[], raw_request=raw_request
    )
    return audit.log_request(ctx, PolicyDecision(allowed=True))


@probe
def audit_counts_entries_to_its_flush():
    from pacsys.supervised._audit import AuditLog

    with tempfile.TemporaryDirectory() as tmp:
        audit = AuditLog(str(Path(tmp) / "audit.jsonl"), flush_interval=3)
        counts = []
        for _ in range(4):
            _audit_request(audit)
            counts.append(audit._writes_since_flush)
        audit.close()
        default = AuditLog(str(Path(tmp) / "other.jsonl"))
        interval = default._flush_interval
        default.close()
    return [counts, interval, _raised(lambda: AuditLog("/dev/null", flush_interval=0))[0]]


@probe
def audit_encodes_frame_lengths():
    from pacsys.supervised._audit import _encode_varint

    seen = []
    for value in (0, 5, 127, 128, 300, 2**31 - 1, 2**40):
        buf = bytearray()
        _encode_varint(buf.extend, value)
        seen.append(buf.hex())
    return seen


@probe
def audit_opens_its_binary_file_at_once():
    # A difference: this AuditLog opens (creates) both files when it is made, so that a path
    # that cannot be written stops a server at startup; the release creates the binary one
    # at its first frame.
    from pacsys.supervised._audit import AuditLog

    with tempfile.TemporaryDirectory() as tmp:
        proto = Path(tmp) / "audit.binpb"
        audit = AuditLog(str(Path(tmp) / "audit.jsonl"), proto_path=str(proto))
        _audit_request(audit, raw_request="not a message")
        audit.close()
        return proto.exists()


# -- pacsys.device ----------------------------------------------------------------------------
# Events in these probes are written in their canonical spelling (`@P,1000`, `@E,2`): the
# release sends an event as it was written, this project in its canonical spelling (see
# device_spells_drfs_canonically), and both must agree on everything else.


def _outcome(fn):
    """What `fn()` gave, or the name of what it raised (messages differ between the two)."""
    try:
        result = fn()
    except ValueError:
        return ["ValueError"]  # DRFError is one
    except Exception as exc:
        return [type(exc).__name__]
    plain = result is None or isinstance(result, bool | int | float | str | list | dict)
    return ["returned", result if plain else type(result).__name__]


def _sent(fake, call):
    """The DRF a device call sent to the fake (a read of an unset device fails: that is fine)."""
    from pacsys.errors import DeviceError

    try:
        call()
    except DeviceError:
        pass
    return fake.reads[-1] if fake.reads else None


@probe
def device_what_it_is():
    from pacsys.device import ArrayDevice, Device, ScalarDevice, TextDevice

    seen = []
    for drf in ("M:OUTTMP", "m_outtmp", "M|OUTTMP", "B:HS23T[0:10]", "M:OUTTMP.RAW", "Z:ACLTST.SETTING.SCALED<-FTP"):
        dev = Device(drf)
        seen.append([drf, dev.drf, dev.name, dev.has_event, dev.is_periodic, repr(dev)])
    for drf in ("M:OUTTMP@P,1000", "M:OUTTMP@Q,500", "M:OUTTMP@E,2", "M:OUTTMP@I", "M:OUTTMP@N", "M:OUTTMP@U"):
        dev = Device(drf)
        seen.append([drf, dev.has_event, dev.is_periodic])
    for bad in ("X", "M:OUTTMP@Z", "", "M:OUTTMP.FOO", "M:OUTTMP[3:1]", 42):
        seen.append([repr(bad), _outcome(lambda b=bad: Device(b))])
    dev = Device("M:OUTTMP")
    seen += [
        dev == ScalarDevice("M:OUTTMP.READING"),
        dev == Device("M:OUTTMP.SETTING"),
        hash(dev) == hash(TextDevice("m:outtmp")),
        _outcome(lambda: setattr(dev, "_backend", None)),
        _outcome(lambda: delattr(dev, "_backend")),
        [cls.__name__ for cls in (ScalarDevice, ArrayDevice, TextDevice) if issubclass(cls, Device)],
    ]
    return seen


@probe
def device_reads_send_these_drfs():
    from pacsys.device import Device
    from pacsys.testing import FakeBackend

    calls = [
        ("M:OUTTMP", "read", {}),
        ("M:OUTTMP", "read", {"field": "raw"}),
        ("M:OUTTMP", "read", {"field": "primary", "timeout": 5.0}),
        ("M:OUTTMP", "setting", {}),
        ("M:OUTTMP", "setting", {"field": "units"}),
        ("M:OUTTMP", "status", {}),
        ("M:OUTTMP", "status", {"field": "on"}),
        ("M:OUTTMP", "status", {"field": "bit_value"}),
        ("M:OUTTMP", "analog_alarm", {}),
        ("M:OUTTMP", "analog_alarm", {"field": "min"}),
        ("M:OUTTMP", "digital_alarm", {}),
        ("M:OUTTMP", "digital_alarm", {"field": "mask"}),
        ("M:OUTTMP", "description", {}),
        ("M:OUTTMP", "get", {}),
        ("M:OUTTMP@P,1000", "get", {}),
        ("M:OUTTMP@P,1000", "read", {}),
        ("M:OUTTMP", "get", {"prop": "setting"}),
        ("M:OUTTMP", "get", {"prop": "sts", "field": "ready"}),
        ("M:OUTTMP", "get", {"prop": "ANALOG", "field": "max"}),
        ("B:HS23T[0:10]", "read", {}),
        ("B:HS23T[0:10]", "setting", {}),
        ("B:HS23T[0:10]", "get", {"prop": "setting"}),
        ("M:OUTTMP<-FTP", "read", {}),
        ("M:OUTTMP<-FTP", "status", {"field": "on"}),
        ("M:OUTTMP.RAW", "read", {}),
        ("M:OUTTMP.RAW", "setting", {}),
        ("M:OUTTMP.RAW", "status", {}),
        ("M:OUTTMP.RAW", "analog_alarm", {}),
        ("M:OUTTMP.UNITS", "status", {}),
        ("M|OUTTMP.ON", "read", {}),
        ("M:OUTTMP.SETTING@P,1000", "read", {}),
        ("M:OUTTMP@E,2<-LOGGER:1000:2000", "read", {}),
        ("M:OUTTMP<-LOGGER:1000:2000", "setting", {}),
        ("M:OUTTMP@P,1000<-LOGGERDURATION:3600", "read", {}),
    ]
    seen = []
    for drf, method, kwargs in calls:
        fake = FakeBackend()
        device = Device(drf, backend=fake)
        seen.append([drf, method, kwargs, _sent(fake, lambda d=device, m=method, k=kwargs: getattr(d, m)(**k))])
    return seen


@probe
def device_refuses_a_field_that_does_not_fit():
    from pacsys.device import Device
    from pacsys.testing import FakeBackend

    fake = FakeBackend()
    dev = Device("M:OUTTMP", backend=fake)
    refused = [
        _outcome(lambda: dev.read(field="on")),
        _outcome(lambda: dev.status(field="primary")),
        _outcome(lambda: dev.setting(field="on")),
        _outcome(lambda: dev.read(field="nonexistent")),
        _outcome(lambda: dev.analog_alarm(field="mask")),
        _outcome(lambda: dev.digital_alarm(field="min")),
        _outcome(lambda: dev.get(field="raw")),
        _outcome(lambda: dev.write(1.0, field="on")),
        _outcome(lambda: dev.get(prop="nonexistent")),
        _outcome(lambda: dev.get(prop="status", field="min")),
    ]
    return [refused, fake.reads, fake.writes]


@probe
def device_values_and_errors():
    from pacsys.device import Device, ScalarDevice
    from pacsys.errors import DeviceError
    from pacsys.testing import FakeBackend
    from pacsys.types import ValueType

    fake = FakeBackend()
    fake.set_reading("M:OUTTMP", 72.5)
    fake.set_reading("M:OUTTMP.SETTING", 50.0)
    # a one-bit status field is a bool, the whole status as it comes; one status per device,
    # as this project's fake keeps one value per device and property
    fake.set_reading("M:OUTTMP.STATUS", 1)
    fake.set_reading("M:STATE1.STATUS.ON", 1)
    fake.set_reading("M:OUTTMP.DESCRIPTION", "Outside temperature", value_type=ValueType.TEXT)
    fake.set_reading("G:NUMBER.DESCRIPTION", 3.0)
    fake.set_error("M:BADDEV", -42, "Device not found")
    dev = Device("M:OUTTMP", backend=fake)
    reading = dev.get()
    seen = [
        dev.read(),
        dev.setting(),
        [type(value).__name__ for value in (dev.status(), Device("M:STATE1", backend=fake).status(field="on"))],
        dev.description(),
        [type(reading).__name__, reading.value, reading.ok, reading.error_code],
        _outcome(lambda: Device("G:NUMBER", backend=fake).description()),
        fake.was_read("M:OUTTMP"),
    ]
    for read in (
        Device("M:BADDEV", backend=fake).read,
        Device("M:NOTSET", backend=fake).read,
        dev.analog_alarm,
        ScalarDevice("M:BADDEV", backend=fake).read,
    ):
        try:
            read()
            seen.append("no error")
        except DeviceError as exc:  # the fakes' default facility for set_error differs: not compared
            seen.append([exc.drf, exc.error_code, exc.message])
    return seen


@probe
def device_writes():
    from pacsys.device import Device
    from pacsys.testing import FakeBackend

    fake = FakeBackend()
    fake.set_reading("M:OUTTMP.SETTING", 0.0)
    seen = []
    for drf, value, kwargs in (
        ("M:OUTTMP", 72.5, {}),
        ("M:OUTTMP", 100, {"field": "raw"}),
        ("M:OUTTMP", 72.5, {"timeout": 2.0}),
        ("M|OUTTMP", 1.0, {}),
        ("M:OUTTMP.RAW@P,1000", 3, {}),
        ("B:HS23T[0:3]", [1.0, 2.0, 3.0, 4.0], {}),
        ("M:OUTTMP<-FTP", 72.5, {}),
    ):
        result = Device(drf, backend=fake).write(value, **kwargs)
        seen.append([drf, type(result).__name__, result.ok, result.verified, result.skipped, list(fake.writes[-1])])
    dev = Device("Z:ACLTST", backend=fake)
    for call in (
        lambda: dev.set_analog_alarm({"minimum": 40, "maximum": 80}),
        lambda: dev.set_digital_alarm({"nominal": 1, "mask": 255}),
    ):
        call()
        seen.append(list(fake.writes[-1]))
    fake.set_write_result("M:OUTTMP.SETTING", success=False, error_code=-1, message="Fail")
    failed = Device("M:OUTTMP", backend=fake).write(72.5)
    seen.append([failed.ok, failed.success, failed.error_code, failed.message, len(fake.reads)])
    return seen


@probe
def device_changed_copies():
    from pacsys.device import ArrayDevice, Device, ScalarDevice, TextDevice
    from pacsys.testing import FakeBackend

    fake = FakeBackend()

    def show(dev):
        return [type(dev).__name__, dev.drf, dev.has_event, dev.is_periodic]

    dev = Device("B:HS23T[0:10]@P,1000<-FTP")
    seen = [
        show(dev.with_event("P,500")),
        show(dev.with_event("E,2")),
        show(dev.without_event()),
        show(dev.with_range(2, 5)),
        show(dev.with_range(5)),
        show(dev.with_range(None, 5)),
        show(dev.with_range(at=3)),
        show(dev.without_range()),
        show(dev.with_extra("LOGGER:100:200")),
        show(dev.with_extra("LIVEDATA")),
        show(dev.with_extra(None)),
        show(Device("M:OUTTMP").without_range()),
        show(Device("M:OUTTMP").without_event()),
        show(dev),  # unchanged by all of the above
        _outcome(lambda: dev.with_range(3, 1)),
        _outcome(lambda: dev.with_range(1, 2, at=3)),
        _outcome(lambda: dev.with_extra("NOTEXTRA")),
        _outcome(lambda: dev.with_event("Z")),
        _outcome(lambda: dev.with_event("@P,1000")),
    ]
    bound = dev.with_backend(fake)
    seen.append([bound._backend is fake, dev._backend is None, bound is not dev, bound.drf == dev.drf])
    chained = Device("M:OUTTMP").with_event("P,1000").with_extra("FTP").with_backend(fake)
    seen.append([show(chained), chained._backend is fake])
    for cls in (ScalarDevice, ArrayDevice, TextDevice):
        typed = cls("B:HS23T[0:10]@P,1000")
        copies = [typed.with_event("I"), typed.with_backend(fake), typed.with_range(0, 1), typed.without_range()]
        copies += [typed.without_event(), typed.with_extra("FTP")]
        seen.append([type(copy).__name__ for copy in copies])
    return seen


def _typed_read(cls, value, value_type):
    """What a typed device's read() gives for a value: its type and value (arrays as lists), or what it raised."""
    from pacsys.testing import FakeBackend

    fake = FakeBackend()
    fake.set_reading("B:HS23T", value, value_type=value_type)
    try:
        got = cls("B:HS23T", backend=fake).read()
    except Exception as exc:
        return [type(exc).__name__]
    return [type(got).__name__, got.tolist() if hasattr(got, "tolist") else got]


@probe
def device_scalar_and_text_check_what_they_read():
    from pacsys.device import ScalarDevice, TextDevice
    from pacsys.types import ValueType

    return [
        _typed_read(ScalarDevice, 72.5, ValueType.SCALAR),
        _typed_read(ScalarDevice, 42, ValueType.SCALAR),
        _typed_read(ScalarDevice, "text", ValueType.TEXT),
        _typed_read(ScalarDevice, [1.0, 2.0], ValueType.SCALAR_ARRAY),
        _typed_read(ScalarDevice, b"\x01", ValueType.RAW),
        _typed_read(TextDevice, "some text", ValueType.TEXT),
        _typed_read(TextDevice, 72.5, ValueType.SCALAR),
        _typed_read(TextDevice, ["a", "b"], ValueType.TEXT_ARRAY),
    ]


@probe
def device_array_gives_numpy_arrays():
    import numpy as np

    from pacsys.device import ArrayDevice
    from pacsys.types import ValueType

    seen = []
    for value, value_type in (
        (np.array([1.0, 2.0, 3.0]), ValueType.SCALAR_ARRAY),
        ([1.0, 2.0, 3.0], ValueType.SCALAR_ARRAY),
        ((1.0, 2.0, 3.0), ValueType.SCALAR_ARRAY),
        (72.5, ValueType.SCALAR),
        ("text", ValueType.TEXT),
    ):
        seen.append(_typed_read(ArrayDevice, value, value_type))
    return seen


@probe
def device_imports_numpy_only_for_an_array():
    # In a fresh interpreter, with a backend of its own (the release's fake imports numpy
    # when a reading is set): whether numpy is imported before and after an ArrayDevice read.
    import subprocess

    import pacsys

    code = """
import sys
sys.path.insert(0, sys.argv[1])
from pacsys.device import ArrayDevice, Device, ScalarDevice, TextDevice

class Values:
    def read(self, drf, timeout=None):
        return {"M": 72.5, "G": "text", "B": [1.0, 2.0]}[drf[0]]

backend = Values()
Device("B:HS23T", backend=backend).read()
ScalarDevice("M:OUTTMP", backend=backend).read()
TextDevice("G:TEXT", backend=backend).read()
before = "numpy" in sys.modules
ArrayDevice("B:HS23T", backend=backend).read()
print(before, "numpy" in sys.modules)
"""
    root = str(Path(pacsys.__file__).resolve().parent.parent)
    done = subprocess.run([sys.executable, "-I", "-c", code, root], capture_output=True, text=True, timeout=120)
    return done.stdout.split() or done.stderr[-500:]


@probe
def device_subscribes():
    from pacsys.device import Device
    from pacsys.testing import FakeBackend

    fake = FakeBackend()
    seen = []
    for drf, kwargs in (
        ("M:OUTTMP", {"event": "P,1000"}),
        ("M:OUTTMP@P,1000", {}),
        ("M:OUTTMP@P,1000", {"event": "E,F"}),
        ("M:OUTTMP", {"prop": "setting", "event": "P,1000"}),
        ("M:OUTTMP", {"prop": "status", "field": "on", "event": "P,1000"}),
        ("B:HS23T[0:10]<-FTP", {"event": "P,1000"}),
        ("M:OUTTMP.RAW@Q,500", {}),
        ("M:OUTTMP", {"event": "I"}),
    ):
        handle = Device(drf, backend=fake).subscribe(**kwargs)
        seen.append([drf, kwargs, handle.stopped, list(handle._drfs)])
        handle.stop()
    dev = Device("M:OUTTMP", backend=fake)
    handle = dev.subscribe(event="P,1000")
    fake.emit_reading("M:OUTTMP.READING@P,1000", 72.5)
    seen.append([reading.value for reading, _ in handle.readings(timeout=0)])
    handle.stop()
    received = []
    handle = dev.subscribe(lambda reading, h: received.append(reading.value), event="P,1000")
    fake.emit_reading("M:OUTTMP.READING@P,1000", 99.0)
    with handle:
        pass
    seen += [received, handle.stopped, len(fake._subscriptions)]
    return seen


@probe
def device_refuses_a_subscription_it_cannot_make():
    from pacsys.device import Device
    from pacsys.testing import FakeBackend

    fake = FakeBackend()
    dev = Device("M:OUTTMP", backend=fake)

    def refused(call, phrase=""):
        try:
            call().stop()
            return "subscribed"
        except (ValueError, TypeError) as exc:
            return [type(exc).__name__ if not isinstance(exc, ValueError) else "ValueError", phrase in str(exc)]

    seen = [
        refused(dev.subscribe, "requires an event"),
        refused(Device("M:OUTTMP@U", backend=fake).subscribe, "requires an event"),
        refused(lambda: dev.subscribe(field="raw", event="P,1000"), "field requires prop"),
        refused(lambda: dev.subscribe(event="N"), "@N"),
        refused(Device("M:OUTTMP@N", backend=fake).subscribe, "@N"),
        refused(lambda: dev.subscribe(event="Z")),
        refused(lambda: dev.subscribe(event="@P,1000")),
        refused(lambda: dev.subscribe(prop="setting", field="on", event="P,1000"), "not allowed"),
        refused(lambda: dev.subscribe("P,1000"), "must be callable"),
        refused(lambda: dev.subscribe(on_error="no", event="P,1000"), "must be callable"),
        refused(lambda: dev.subscribe(lambda r: None, event="P,1000"), "must accept 2 arguments"),
        refused(lambda: dev.subscribe(on_error=lambda e: None, event="P,1000"), "must accept 2 arguments"),
        refused(lambda: dev.subscribe(lambda *args: None, event="P,1000")),
        refused(lambda: dev.subscribe(lambda r, h, extra=None: None, event="P,1000")),
        refused(lambda: dev.subscribe(print, event="P,1000")),
    ]
    return [seen, len(fake._subscriptions)]


@probe
def device_awaits_the_next_reading():
    from pacsys.device import Device
    from pacsys.testing import FakeBackend

    fake = FakeBackend()
    threading.Timer(0.05, lambda: fake.emit_reading("M:OUTTMP.READING@P,1000", 99.0)).start()
    first = Device("M:OUTTMP@P,1000", backend=fake).await_next(timeout=10).value
    threading.Timer(0.05, lambda: fake.emit_reading("M:OUTTMP.SETTING@P,500", 77.0)).start()
    second = Device("M:OUTTMP", backend=fake).await_next(prop="setting", event="P,500", timeout=10).value
    start = time.monotonic()
    timed_out = _outcome(lambda: Device("M:OUTTMP@P,1000", backend=fake).await_next(timeout=0.1))
    waited = time.monotonic() - start
    no_event = _outcome(lambda: Device("M:OUTTMP", backend=fake).await_next(timeout=0.1))
    return [first, second, timed_out, 0.05 <= waited < 5, no_event, len(fake._subscriptions)]


@probe
def device_spells_drfs_canonically():
    # A difference: this project's Device sends DRFs in pacsys.drf's canonical spelling; the
    # release keeps an event and an extra as they were written. Both name the same request.
    from pacsys.device import Device

    dev = Device("M:OUTTMP@p,1000")
    return [
        dev.drf,
        Device("M:OUTTMP[]").drf,
        Device("M:OUTTMP@U").drf,
        dev.with_range().drf,
        dev.with_event("e,0f").drf,
        dev.with_extra("logger:1:2").drf,
        dev.with_event("p,10h").drf,
    ]


# -- pacsys.drf_utils -------------------------------------------------------------------------

_NAMES = [
    "M:OUTTMP",
    "m_outtmp.setting@p,1000",
    "B:HS23T[0:10]@p,1000",
    "G:AMANDA<-LOGGER",
    "M|OUTTMP",
    "Z:ACLTST.STATUS",
    # not DRFs: passed through
    "hello world",
    "HELLO",
    "1234",
    "Mx:OUT",
    "dev:pv_name",
    "dev:pv.VAL@p,1000",
    "Z:ACL TST",
    "M:OUTTMP extra",
    "XF:31IDA-OP{Tbl-Ax:X1}Mtr",
    "XF:31IDA-OP{Tbl-Ax:X1}Mtr.RBV@I",
    "hello<-LOGGER",
    "M:OUT\x00TMP",
    # malformed: refused
    "",
    "  ",
    "x",
    "AB",
    "M:",
    "M:OUTTMP.FOO",
    "M:OUTTMP@X",
    "M_OUTTMP.",
    "M:OUTTMP<-FOO",
    "abc@zz",
    "M:OUTTMP@s,M:OTHER,1,value,=",
]


@probe
def drf_utils_on_drfs_and_other_names():
    from pacsys.drf_utils import get_device_name, prepare_for_write

    return [
        [name, _raised(lambda n=name: get_device_name(n)), _raised(lambda n=name: prepare_for_write(n))]
        for name in _NAMES
    ]


def main(args):
    if args[:1] == ["--root"]:  # this project's pacsys under another interpreter (one with numpy)
        sys.path.insert(0, args[1])
        args = args[2:]
    import pacsys

    out = {"__pacsys__": str(Path(pacsys.__file__).resolve().parent)}
    for name in args or PROBES:
        out[name] = PROBES[name]()
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
