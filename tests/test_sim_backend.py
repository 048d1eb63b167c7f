"""Tests of the simulated backend, pacsys.backends.sim.SimBackend.

Plain sync tests: each runs its coroutine with asyncio.run. Timing assertions are loose bounds.
"""

from __future__ import annotations

import asyncio
import math
import struct
from datetime import UTC

import pytest
from helpers import until

from pacsys import status as st
from pacsys.aio import AsyncBackend
from pacsys.backends.sim import (
    CLOCK_EVENT_PERIODS_US,
    DEFAULT_CLOCK_EVENT_PERIOD_US,
    MIN_PERIOD_US,
    STATE_EVENT_PERIOD_US,
    DeviceTable,
    SimBackend,
)
from pacsys.backends.sim.ticker import schedule as event_schedule
from pacsys.drf import parse_cached
from pacsys.types import BackendCapability, ValueType


class Clock:
    """An injectable clock that only moves when told to."""

    def __init__(self, t: float = 1_700_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def run(coro):
    return asyncio.run(coro)


async def read_all(backend: SimBackend, *drfs: str):
    return await backend.get_many(list(drfs))


async def collect(handle, seconds: float):
    return [reading async for reading, _ in handle.readings(timeout=seconds)]


# -- reads --------------------------------------------------------------------------------


def test_is_an_async_backend_with_read_write_stream_batch():
    backend = SimBackend()
    assert isinstance(backend, AsyncBackend)
    want = BackendCapability.READ | BackendCapability.WRITE | BackendCapability.STREAM | BackendCapability.BATCH
    assert backend.capabilities == want


def test_scalar_readings_have_utc_timestamps_and_the_callers_drf():
    async def main():
        async with SimBackend() as backend:
            return await read_all(backend, "m:outtmp.read@p,1000", "G:AMANDA", "Z:ACLTST@i")

    outtmp, amanda, acltst = run(main())
    assert outtmp.drf == "m:outtmp.read@p,1000"  # exactly as passed, not canonicalised
    assert outtmp.ok and outtmp.value_type is ValueType.SCALAR and isinstance(outtmp.value, float)
    assert 70.0 <= outtmp.value <= 75.0
    assert outtmp.timestamp is not None and outtmp.timestamp.tzinfo is not None
    assert outtmp.timestamp.utcoffset() == UTC.utcoffset(None)
    assert outtmp.meta is not None and outtmp.meta.units == "DegF" and outtmp.units == "DegF"
    assert abs(amanda.value - 42.0) < 0.1
    assert acltst.value == 0.0


def test_outtmp_follows_its_slow_sine():
    clock = Clock(150.0)  # a quarter of the 600 s cycle: sin = 1

    async def main():
        async with SimBackend(clock=clock) as backend:
            peak = (await backend.get("M:OUTTMP")).value
            clock.t = 450.0
            trough = (await backend.get("M:OUTTMP")).value
            return peak, trough

    peak, trough = run(main())
    assert abs(peak - 74.5) <= 0.05
    assert abs(trough - 70.5) <= 0.05


def test_setting_and_reading_are_different_properties():
    async def main():
        async with SimBackend() as backend:
            return await read_all(backend, "M_OUTTMP", "M:OUTTMP.SETTING", "M:OUTTMP", "Z_ACLTST")

    setting, setting2, reading, acl_setting = run(main())
    assert setting.value == setting2.value == 72.5
    assert setting.value_type is ValueType.SCALAR
    assert reading.value != 72.5  # a reading moves (sine and noise); the setting does not
    assert acl_setting.value == 0.0


def test_array_device_and_ranges():
    async def main():
        async with SimBackend(clock=Clock()) as backend:
            return await read_all(
                backend, "B:HS23T", "B:HS23T[2:4]", "B:HS23T[3]", "B:HS23T[:]", "B:HS23T[14:]", "B:HS23T[16]"
            )

    whole, part, one, all_, tail, outside = run(main())
    assert whole.value_type is ValueType.SCALAR_ARRAY and len(whole.value) == 16
    assert all(isinstance(v, float) for v in whole.value)
    assert part.value_type is ValueType.SCALAR_ARRAY and part.value == whole.value[2:5]  # [a:b] is inclusive
    assert one.value_type is ValueType.SCALAR and one.value == whole.value[3]
    assert all_.value == whole.value
    assert tail.value == whole.value[14:]
    assert (outside.facility_code, outside.error_code) == (st.DPM, st.DPM_BAD_RANGE)


def test_raw_units_and_byte_ranges():
    async def main():
        async with SimBackend(clock=Clock()) as backend:
            return await read_all(
                backend, "Z:ACLTST.RAW", "M:OUTTMP.UNITS", "B:HS23T{4:8}", "M:OUTTMP{4:8}", "G:AMANDA[1]"
            )

    raw, units, byte_range, too_far, bad_index = run(main())
    assert raw.value_type is ValueType.RAW and raw.value == bytes(8)  # one big-endian double
    assert units.value_type is ValueType.TEXT and units.value == "DegF"
    assert byte_range.value_type is ValueType.RAW and len(byte_range.value) == 8
    assert too_far.error_code == st.DPM_BAD_RANGE
    assert bad_index.error_code == st.DPM_BAD_RANGE


def test_raw_of_any_finite_setting():
    async def main():
        async with SimBackend() as backend:
            await backend.write("Z:ACLTST", 1e300)  # far beyond float32: RAW must still work
            return await read_all(backend, "Z:ACLTST.RAW", "Z_ACLTST.RAW")

    reading, setting = run(main())
    assert reading.value == setting.value == struct.pack(">d", 1e300)


def test_status_alarm_and_description_properties():
    async def main():
        async with SimBackend(clock=Clock()) as backend:
            return await read_all(
                backend, "Z|SIMPS", "Z@SIMPS", "Z$SIMPS", "M:OUTTMP.ANALOG", "Z~SIMPS", "Z|SIMPS.ON", "Z@SIMPS.MAX"
            )

    status, analog, digital, outtmp_alarm, desc, on, maximum = run(main())
    assert status.value_type is ValueType.BASIC_STATUS
    assert status.value == {"on": True, "ready": True, "remote": True, "positive": True, "ramp": False}
    assert analog.value_type is ValueType.ANALOG_ALARM
    assert set(analog.value) == {
        "minimum",
        "maximum",
        "alarm_enable",
        "alarm_status",
        "abort",
        "abort_inhibit",
        "tries_needed",
        "tries_now",
    }
    assert analog.value["alarm_status"] is False
    assert digital.value_type is ValueType.DIGITAL_ALARM
    assert {"nominal", "mask", "alarm_enable", "alarm_status"} <= set(digital.value)
    assert "minimum" not in digital.value
    assert outtmp_alarm.value["minimum"] == 40.0
    assert desc.value_type is ValueType.TEXT and "power supply" in desc.value
    assert on.value == 1.0
    assert maximum.value == 20.0


def test_unknown_device_property_and_malformed_drfs_are_error_readings():
    async def main():
        async with SimBackend() as backend:
            return await read_all(
                backend,
                "X:NOSUCH",
                "G:AMANDA.SETTING",
                "G:AMANDA.STATUS",
                "Z&SIMPS",
                "M:OUTTMP@P,abc",
                "AB",
                "M:OUTTMP.MIN",
                "M:OUTTMP<-LOGGER:1000:2000",
                "G:AMANDA",
            )

    readings = run(main())
    codes = [(r.facility_code, r.error_code) for r in readings[:-1]]
    assert codes == [
        (st.DPM, st.DPM_NO_SUCH_DEVICE),
        (st.DPM, st.DPM_NO_SUCH_PROPERTY),
        (st.DPM, st.DPM_NO_SUCH_PROPERTY),
        (st.DPM, st.DPM_NO_SUCH_PROPERTY),  # CONTROL is write-only
        (st.DPM, st.DPM_BAD_EVENT),
        (st.DPM, st.DPM_NO_SUCH_DEVICE),
        (st.DPM, st.DPM_NO_SUCH_PROPERTY),
        (st.DPM, st.DPM_NO_SUCH_PROPERTY),
    ]
    assert "X:NOSUCH" in readings[0].message
    assert all(not r.ok and r.value is None and r.message for r in readings[:-1])
    assert [r.drf for r in readings][:2] == ["X:NOSUCH", "G:AMANDA.SETTING"]
    assert readings[-1].ok  # the good DRF of the batch is unaffected


def test_generated_family_exists_without_being_listed():
    async def main():
        async with SimBackend() as backend:
            return await read_all(backend, "Z:SIM000", "Z:SIM042", "Z:SIM999", "Z:SIM1000", "Z:SIM42")

    first, middle, last, too_high, too_short = run(main())
    assert first.ok and middle.ok and last.ok
    assert first.value_type is ValueType.SCALAR and 3.9 <= middle.value <= 6.1
    assert first.meta.description.endswith("000 (simulated)")
    assert too_high.error_code == st.DPM_NO_SUCH_DEVICE
    assert too_short.error_code == st.DPM_NO_SUCH_DEVICE


def test_family_count_and_custom_tables(tmp_path):
    path = tmp_path / "devices.toml"
    path.write_text(
        '[devices."Q:ONE"]\nbase = 3.0\ndescription = "one"\n'
        '[[families]]\nprefix = "Q:LOAD"\ndigits = 4\ncount = 20\nbase = 1.0\n'
    )

    async def main():
        async with SimBackend(devices=path) as backend:
            return await read_all(backend, "Q:ONE", "Q:LOAD0019", "Q:LOAD0020", "M:OUTTMP")

    one, member, beyond, outtmp = run(main())
    assert one.value == 3.0 and member.value == 1.0
    assert beyond.error_code == st.DPM_NO_SUCH_DEVICE
    assert outtmp.error_code == st.DPM_NO_SUCH_DEVICE  # only this table's devices exist
    with pytest.raises(ValueError, match="unknown key"):
        DeviceTable.load({"devices": {"Q:TYPO": {"bsae": 1.0}}})
    with pytest.raises(ValueError, match="cannot be settable"):
        DeviceTable.load({"devices": {"Q:ARR": {"length": 4, "setting": 1.0}}})


# -- writes -------------------------------------------------------------------------------


def test_write_then_read_and_reading_follows_setting():
    clock = Clock(0.0)  # sin(0) = 0: M:OUTTMP reads its setting plus noise

    async def main():
        async with SimBackend(clock=clock) as backend:
            results = await backend.write_many([("Z:ACLTST", 12.5), ("M:OUTTMP", 80), ("Z_ACLTST.SETTING@N", -1.5)])
            readings = await read_all(backend, "Z:ACLTST", "Z_ACLTST", "M:OUTTMP", "M_OUTTMP")
            return results, readings

    results, (acl, acl_setting, outtmp, outtmp_setting) = run(main())
    assert all(r.ok for r in results)
    assert [r.drf for r in results] == ["Z:ACLTST", "M:OUTTMP", "Z_ACLTST.SETTING@N"]
    assert acl.value == acl_setting.value == -1.5  # writes applied in call order
    assert outtmp_setting.value == 80.0 and isinstance(outtmp_setting.value, float)
    assert abs(outtmp.value - 80.0) <= 0.05


def test_write_errors():
    async def main():
        async with SimBackend() as backend:
            results = await backend.write_many(
                [
                    ("G:AMANDA", 1.0),
                    ("X:NOSUCH", 1.0),
                    ("Z:ACLTST", "abc"),
                    ("Z:ACLTST", True),
                    ("Z:ACLTST", math.nan),
                    ("Z:ACLTST", [1.0]),
                    ("Z:ACLTST[3]", 1.0),
                    ("Z~ACLTST", "new text"),
                    ("Z:ACLTST", 7),
                ]
            )
            return results, (await backend.get("Z:ACLTST")).value

    results, final = run(main())
    codes = [r.error_code for r in results]
    assert codes == [
        st.DPM_NO_SUCH_PROPERTY,
        st.DPM_NO_SUCH_DEVICE,
        st.DPM_BAD_RANGE,
        st.DPM_BAD_RANGE,
        st.DPM_BAD_RANGE,
        st.DPM_BAD_RANGE,
        st.DPM_BAD_RANGE,
        st.DPM_NO_SUCH_PROPERTY,
        0,
    ]
    assert all(r.facility_code == st.DPM for r in results[:-1]) and all(r.message for r in results[:-1])
    assert final == 7.0  # failed writes changed nothing; the good one applied


def test_control_changes_status_and_the_reading():
    async def main():
        async with SimBackend(clock=Clock()) as backend:
            out = {}
            w = await backend.write_many([("Z&SIMPS", "off"), ("Z|SIMPS", "LOCAL")])
            out["off"] = w, await read_all(backend, "Z|SIMPS", "Z:SIMPS", "Z$SIMPS")
            await backend.write_many([("Z&SIMPS", 1), ("Z&SIMPS", "trip")])
            out["trip"] = (await backend.get("Z|SIMPS")).value
            await backend.write_many([("Z&SIMPS", "reset"), ("Z&SIMPS", "on")])
            out["reset"] = await read_all(backend, "Z|SIMPS", "Z:SIMPS", "Z$SIMPS")
            out["bad"] = await backend.write_many([("Z&SIMPS", "explode"), ("Z&SIMPS", 42), ("G&AMANDA", "on")])
            return out

    out = run(main())
    writes, (status, reading, digital) = out["off"]
    assert all(r.ok for r in writes)
    assert status.value["on"] is False and status.value["remote"] is False
    assert reading.value == 0.0  # a supply that is off reads 0
    assert digital.value["alarm_status"] is True  # the on bit is not nominal
    assert out["trip"]["on"] is False and out["trip"]["ready"] is False
    status, reading, digital = out["reset"]
    assert status.value["on"] is True and status.value["ready"] is True
    assert abs(reading.value - 10.0) < 0.01 and digital.value["alarm_status"] is False
    assert [r.error_code for r in out["bad"]] == [st.DPM_BAD_RANGE, st.DPM_BAD_RANGE, st.DPM_NO_SUCH_PROPERTY]


def test_alarm_block_writes():
    async def main():
        async with SimBackend(clock=Clock()) as backend:
            results = await backend.write_many(
                [
                    ("Z@SIMPS.MAX", 5.0),  # the 10 A reading is now out of range
                    ("Z$SIMPS", {"mask": 1, "tries_needed": 3}),
                    ("Z@SIMPS", {"minimum": 50.0}),  # minimum above maximum
                    ("Z@SIMPS", {"alarm_status": False}),  # computed, not settable
                    ("G@AMANDA", {"minimum": 1.0}),
                ]
            )
            return results, await read_all(backend, "Z@SIMPS", "Z$SIMPS")

    results, (analog, digital) = run(main())
    assert [r.error_code for r in results] == [0, 0, st.DPM_BAD_RANGE, st.DPM_BAD_RANGE, st.DPM_NO_SUCH_PROPERTY]
    assert analog.value["maximum"] == 5.0 and analog.value["minimum"] == 0.0
    assert analog.value["alarm_status"] is True
    assert digital.value["mask"] == 1 and digital.value["tries_needed"] == 3


# -- determinism --------------------------------------------------------------------------


def test_same_seed_and_clock_give_the_same_values_whatever_the_order():
    drfs = ["M:OUTTMP", "G:AMANDA", "B:HS23T", "Z:SIM123", "Z@SIMPS"]

    async def values(seed, order, t=1_700_000_123.456):
        async with SimBackend(seed=seed, clock=Clock(t)) as backend:
            await read_all(backend, "Z:SIM007", "G:AMANDA")  # unrelated earlier reads change nothing
            readings = await read_all(backend, *order)
            return {r.drf: (r.value, r.timestamp) for r in readings}

    first = run(values(7, drfs))
    again = run(values(7, list(reversed(drfs))))
    assert first == again
    other_seed = run(values(8, drfs))
    assert other_seed["G:AMANDA"][0] != first["G:AMANDA"][0]
    assert other_seed["B:HS23T"][0] != first["B:HS23T"][0]
    later = run(values(7, drfs, t=1_700_000_123.457))  # the noise changes every millisecond
    assert later["G:AMANDA"][0] != first["G:AMANDA"][0]


# -- subscriptions ------------------------------------------------------------------------


def test_periodic_subscription_delivers_about_the_right_count():
    async def main():
        async with SimBackend() as backend:
            handle = await backend.subscribe(["G:AMANDA@p,100"])
            readings = await collect(handle, 1.0)
            await handle.stop()
            return readings

    readings = run(main())
    assert 3 <= len(readings) <= 30
    assert all(r.drf == "G:AMANDA@p,100" and r.ok for r in readings)


def test_ticks_of_one_period_fall_on_the_same_grid_in_every_backend():
    """Two backends (two workers) started apart tick together: on multiples of the period."""

    async def first_arrival(backend: SimBackend) -> float:
        handle = await backend.subscribe(["G:AMANDA@p,500"])
        await handle.wait()
        arrived = asyncio.get_running_loop().time()
        await handle.stop()
        return arrived

    async def later(backend: SimBackend) -> float:
        await asyncio.sleep(0.2)  # the second subscribes 200 ms into the first's period
        return await first_arrival(backend)

    async def main():
        async with SimBackend() as a, SimBackend() as b:
            return await asyncio.gather(first_arrival(a), later(b))

    arrivals = run(main())
    phases = [t % 0.5 for t in arrivals]
    apart = abs(phases[0] - phases[1])
    assert min(apart, 0.5 - apart) < 0.1, arrivals  # loose: scheduling noise, not the grid


def test_immediate_flag_sends_one_reading_at_once():
    async def main():
        async with SimBackend() as backend:
            eager = await backend.subscribe(["Z:ACLTST@p,10s,true"])
            lazy = await backend.subscribe(["Z:ACLTST@p,10s"])
            return await collect(eager, 0.2), await collect(lazy, 0.2)

    eager, lazy = run(main())
    assert len(eager) == 1 and eager[0].value == 0.0
    assert lazy == []


def test_unknown_device_in_a_subscription_is_isolated():
    async def main():
        async with SimBackend() as backend:
            handle = await backend.subscribe(["X:NOSUCH@p,50", "G:AMANDA@p,50", "G:AMANDA.STATUS@p,50"])
            readings = await collect(handle, 0.5)
            count = backend.subscription_count
            await handle.stop()
            return readings, count

    readings, count = run(main())
    errors = [r for r in readings if not r.ok]
    assert [(r.drf, r.error_code) for r in errors] == [
        ("X:NOSUCH@p,50", st.DPM_NO_SUCH_DEVICE),
        ("G:AMANDA.STATUS@p,50", st.DPM_NO_SUCH_PROPERTY),
    ]
    assert readings[0].drf == "X:NOSUCH@p,50"  # the errors come first, at once
    good = [r for r in readings if r.ok]
    assert len(good) >= 3 and {r.drf for r in good} == {"G:AMANDA@p,50"}
    assert count == 1


def test_on_change_sends_a_constant_once_and_again_after_a_write():
    async def main():
        async with SimBackend() as backend:
            handle = await backend.subscribe(["Z:ACLTST@q,20", "G:AMANDA@q,20"])
            first = await collect(handle, 0.3)
            await backend.write("Z:ACLTST", 3.0)
            second = await collect(handle, 0.2)
            await handle.stop()
            return first, second

    first, second = run(main())
    assert [r.value for r in first if r.drf == "Z:ACLTST@q,20"] == [0.0]
    assert [r.value for r in second if r.drf == "Z:ACLTST@q,20"] == [3.0]
    assert len([r for r in first if r.drf == "G:AMANDA@q,20"]) >= 3  # noisy: changes every period


def test_one_dispatch_per_tick_and_one_ticker_per_period():
    drfs = [f"Z:SIM{i:03d}@p,20" for i in range(150)]

    async def main():
        async with SimBackend() as backend:
            a = await backend.subscribe(drfs)
            b = await backend.subscribe(["G:AMANDA@p,20", "M:OUTTMP@p,20", "B:HS23T@p,50"])
            calls = []
            original = a.dispatch_many
            a.dispatch_many = lambda readings: (calls.append(len(tuple(readings))), original(readings))  # type: ignore[method-assign]
            await asyncio.sleep(0.5)
            tickers = backend.ticker_count
            readings = a.drain()
            await a.stop()
            await b.stop()
            await asyncio.sleep(0)
            return calls, readings, tickers, backend.subscription_count, backend.ticker_count

    calls, readings, tickers, subs_after, tickers_after = run(main())
    assert tickers == 2  # 20 ms (shared by both handles) and 50 ms
    assert 5 <= len(calls) <= 40 and set(calls) == {150}  # every tick: all 150 DRFs in one call
    assert len(readings) == sum(calls)
    assert (subs_after, tickers_after) == (0, 0)


def test_stop_removes_the_subscription():
    async def main():
        async with SimBackend() as backend:
            handles = [await backend.subscribe(["G:AMANDA@p,50"]) for _ in range(3)]
            before = backend.subscription_count, backend.ticker_count
            await handles[0].stop()
            await handles[0].stop()  # idempotent
            middle = backend.subscription_count
            await backend.remove(handles[1])
            await backend.stop_streaming()
            return before, middle, backend.subscription_count, backend.ticker_count, [h.stopped for h in handles]

    before, middle, after, tickers, stopped = run(main())
    assert before == (3, 1)
    assert middle == 2
    assert (after, tickers) == (0, 0)
    assert stopped == [True, True, True]


def test_event_rates():
    backend = SimBackend()
    outtmp = backend.table.lookup("M:OUTTMP")
    hs23t = backend.table.lookup("B:HS23T")
    assert outtmp is not None and hs23t is not None

    def schedule(drf, spec=outtmp):
        return event_schedule(parse_cached(drf).event, spec)

    assert schedule("M:OUTTMP") == (1_000_000, False, False)
    assert schedule("M:OUTTMP@U") == (1_000_000, False, False)
    assert schedule("B:HS23T", hs23t) == (500_000, False, False)  # per-device default from the table
    assert schedule("M:OUTTMP@P,10H") == (100_000, False, False)
    assert schedule("M:OUTTMP@Q,250,T") == (250_000, True, True)
    assert schedule("M:OUTTMP@P,1U") == (MIN_PERIOD_US, False, False)
    assert schedule("M:OUTTMP@E,0F") == (CLOCK_EVENT_PERIODS_US[0x0F], False, False)
    assert schedule("M:OUTTMP@E,0F")[0] == 66_667
    assert schedule("M:OUTTMP@E,AB,H,100") == (DEFAULT_CLOCK_EVENT_PERIOD_US, False, False)
    assert schedule("M:OUTTMP@S,G:AMANDA,1,100,=") == (STATE_EVENT_PERIOD_US, False, False)
    assert schedule("M:OUTTMP@I") == (None, True, False)


def test_clock_event_streams_at_about_15_hz():
    async def main():
        async with SimBackend() as backend:
            handle = await backend.subscribe(["G:AMANDA@E,0F"])
            return await collect(handle, 0.5)

    readings = run(main())
    assert 3 <= len(readings) <= 15


def test_callback_mode():
    got = []

    async def main():
        async with SimBackend() as backend:
            handle = await backend.subscribe(["G:AMANDA@p,50,true"], callback=lambda r, h: got.append((r, h)))
            await until(lambda: len(got) >= 3)
            await handle.stop()
            return handle

    handle = run(main())
    assert len(got) >= 3 and all(h is handle for _, h in got)
    assert len(handle) == 0  # delivered to the callback instead of the buffer


def test_close_ends_subscriptions_and_refuses_later_calls():
    async def main():
        backend = SimBackend()
        handle = await backend.subscribe(["G:AMANDA@p,50", "M:OUTTMP@p,100"])
        consumer = asyncio.ensure_future(collect(handle, 5.0))
        await until(lambda: handle.delivered > 0)
        await backend.close()
        readings = await asyncio.wait_for(consumer, 1.0)  # the iteration ends: no 5 s wait
        assert handle.stopped and backend.subscription_count == 0 and backend.ticker_count == 0
        await backend.close()  # again: fine
        await handle.stop()  # after close: fine
        for call in (backend.get_many(["G:AMANDA"]), backend.write("Z:ACLTST", 1.0), backend.subscribe(["G:AMANDA"])):
            with pytest.raises(RuntimeError, match="backend is closed"):
                await call
        return readings

    readings = run(main())
    assert len(readings) >= 1
