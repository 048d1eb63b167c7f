"""Tests of the DRF parser (pacsys.drf) and pacsys.drf_utils.get_device_name."""

from __future__ import annotations

import dataclasses
import pickle

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pacsys import drf as drf_module
from pacsys.drf import (
    DRF,
    FIELD_ALIASES,
    MAX_DRF_LENGTH,
    PROPERTY_ALIASES,
    DRFError,
    Event,
    Extra,
    Field,
    Property,
    Range,
    canonical,
    is_oneshot,
    parse,
    parse_cached,
    prepare_for_write,
)
from pacsys.drf_utils import get_device_name, guess_device_name
from pacsys.drf_utils import prepare_for_write as drf_utils_prepare_for_write


def _err(text: object) -> DRFError:
    with pytest.raises(DRFError) as info:
        parse(text)  # type: ignore[arg-type]
    return info.value


# ---------------------------------------------------------------------------------------------
# The spec's examples


def test_spec_valid_examples() -> None:
    assert parse("M:OUTTMP") == DRF("M:OUTTMP", Property.READING)
    assert parse("m:outtmp.read@p,1000") == DRF("M:OUTTMP", Property.READING, event=Event("P", period=1_000_000))
    assert parse("M_OUTTMP") == DRF("M:OUTTMP", Property.SETTING)
    assert parse("M|OUTTMP") == DRF("M:OUTTMP", Property.STATUS)
    assert parse("M:OUTTMP.SETTING[0:10]@p,1000") == DRF(
        "M:OUTTMP", Property.SETTING, Range("array", 0, 10), event=Event("P", period=1_000_000)
    )
    assert parse("M:OUTTMP[]") == DRF("M:OUTTMP", Property.READING, Range("array"))
    assert parse("M:OUTTMP{4:8}") == DRF("M:OUTTMP", Property.READING, Range("byte", 4, 8))
    assert parse("M:OUTTMP.RAW[0:3]") == DRF("M:OUTTMP", Property.READING, Range("array", 0, 3), Field.RAW)
    assert parse("M:OUTTMP@P,10H").event == Event("P", period=100_000)  # 10 Hz = 100 ms
    assert parse("M:OUTTMP@E,8F,E,100").event == Event("E", clock_event=0x8F, clock_type="E", delay=100_000)
    assert parse("M:OUTTMP@S,G:AMANDA,1,100,=").event == Event("S", device="G:AMANDA", value=1, delay=100_000, op="=")
    assert parse("M:OUTTMP@i").event == Event("I")
    assert parse("Z:ACLTST<-LOGGER:1000:2000") == DRF("Z:ACLTST", Property.READING, extra=Extra("LOGGER", ":1000:2000"))


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ("AB", 0),
        ("M:OUTTMP.FOO", 9),
        ("M:OUTTMP@X", 9),
        ("M:OUTTMP@P,abc", 11),
        ("M:OUTTMP@p,1000,yes", 16),
        ("M:OUTTMP@E,0F,B", 14),
        ("M:OUTTMP@S,G:AMANDA,1,100", 25),
        ("M:OUTTMP@N,1", 10),
        ("M:OUTTMP[1:2:3]", 8),
        ("M:OUTTMP<-BOGUS", 10),
        ("", None),
        ("M:OUT\nTMP", 5),
        ("M:OUTTMP\n", 8),
        ("M:OUT\x00TMP", 5),
        ("M:" + "A" * (MAX_DRF_LENGTH - 1), MAX_DRF_LENGTH),
    ],
)
def test_spec_invalid_examples(text: str, position: int | None) -> None:
    error = _err(text)
    assert error.drf == text
    assert error.position == position


def test_error_message_format() -> None:
    error = _err("M:OUTTMP.FOO")
    assert isinstance(error, ValueError)
    assert str(error) == "invalid DRF 'M:OUTTMP.FOO': unknown field 'FOO' (at 9)"
    assert error.reason == "unknown field 'FOO'"
    assert str(_err("")) == "invalid DRF '': empty"


def test_error_pickles_with_its_attributes() -> None:
    error = pickle.loads(pickle.dumps(_err("M:OUTTMP@X")))
    assert isinstance(error, DRFError)
    assert (error.drf, error.position) == ("M:OUTTMP@X", 9)
    assert str(error) == str(_err("M:OUTTMP@X"))


def test_long_input_is_shortened_in_the_message_only() -> None:
    text = "M:" + "A" * 600
    error = _err(text)
    assert error.drf == text
    assert len(str(error)) < 200


@pytest.mark.parametrize("value", [None, 42, 1.5, b"M:OUTTMP", ["M:OUTTMP"], {"a": 1}, object()])
def test_non_str_input_raises_drf_error(value: object) -> None:
    error = _err(value)
    assert error.position is None
    assert "str" in error.reason
    with pytest.raises(DRFError):
        parse_cached(value)  # type: ignore[arg-type]  # unhashable values must not reach the cache


def test_hostile_repr_does_not_escape() -> None:
    class Hostile:
        def __repr__(self) -> str:
            raise RuntimeError("no")

    assert _err(Hostile()).drf == "<Hostile>"


def test_str_subclass_is_accepted() -> None:
    class Name(str):
        pass

    assert parse(Name("M:OUTTMP")) == parse("M:OUTTMP")
    assert type(parse(Name("M:OUTTMP")).device) is str


@pytest.mark.parametrize("char", ["\t", "\r", "\x7f", "\x1b", "\u00e9", "\u2028", "\u200b", "\ufeff"])
def test_control_and_non_ascii_characters_are_refused(char: str) -> None:
    assert _err(f"M:OUT{char}TMP").position == 5
    assert _err(f"Z:ACLTST<-LOGGER:{char}").position == 17


def test_length_limit() -> None:
    head = "Z:ACLTST<-LOGGER:"
    ok = head + "1" * (MAX_DRF_LENGTH - len(head))
    assert len(ok) == MAX_DRF_LENGTH
    assert parse(ok).extra == Extra("LOGGER", ":" + "1" * (MAX_DRF_LENGTH - len(head)))
    assert _err(ok + "1").position == MAX_DRF_LENGTH
    assert drf_module.MAX_DRF_LENGTH == 512


# ---------------------------------------------------------------------------------------------
# Device


@pytest.mark.parametrize(
    ("qualifier", "prop"),
    [
        (":", Property.READING),
        ("?", Property.READING),
        ("_", Property.SETTING),
        ("|", Property.STATUS),
        ("&", Property.CONTROL),
        ("@", Property.ANALOG),
        ("$", Property.DIGITAL),
        ("~", Property.DESCRIPTION),
        ("^", Property.INDEX),
        ("#", Property.LONG_NAME),
        ("!", Property.ALARM_LIST_NAME),
    ],
)
def test_qualifier_picks_the_default_property(qualifier: str, prop: Property) -> None:
    result = parse(f"m{qualifier}outtmp")
    assert result.device == "M:OUTTMP"
    assert result.property is prop
    # an explicit property wins over the qualifier
    assert parse(f"M{qualifier}OUTTMP.DESC").property is Property.DESCRIPTION
    # the qualifier '@' does not start an event
    assert parse(f"M{qualifier}OUTTMP@I").event == Event("I")


def test_device_first_character() -> None:
    assert parse("0:ABC").device == "0:ABC"
    assert parse("#:ABC").device == "#:ABC"
    assert parse("##ABC") == DRF("#:ABC", Property.LONG_NAME)
    for bad in ("1:ABC", "_:ABC", ":ABC", ".ABC", " M:OUTTMP", "@:ABC"):
        assert _err(bad).position == 0, bad


def test_device_name_characters() -> None:
    assert parse("z:ab_c:d-e9").device == "Z:AB_C:D-E9"
    assert _err("M*OUTTMP").position == 1  # not a qualifier
    assert _err("M:OUT TMP").position == 5
    assert _err("M:OUT/TMP").position == 5
    assert _err("M:OUTTMP ").position == 8


def test_device_name_length_limits() -> None:
    assert parse("M:A").device == "M:A"  # 3 characters: the shortest
    for short in ("M", "M:", "AB", "M:.READING", "M:[0]", "M:@I", "M:<-LOGGER"):
        assert "too short" in _err(short).reason, short
    longest = "M:" + "A" * 62
    assert parse(longest).device == longest
    assert parse(longest + ".SETTING@N").property is Property.SETTING
    too_long = _err("M:" + "A" * 63)
    assert "too long" in too_long.reason
    assert too_long.position == 64


# ---------------------------------------------------------------------------------------------
# Property and field


@pytest.mark.parametrize(("alias", "prop"), sorted(PROPERTY_ALIASES.items()))
def test_every_property_alias(alias: str, prop: Property) -> None:
    assert parse(f"M:OUTTMP.{alias}").property is prop
    assert parse(f"M:OUTTMP.{alias.lower()}").property is prop
    assert parse(f"M_OUTTMP.{alias.title()}[3]@I").property is prop


def test_property_alias_table_is_the_spec() -> None:
    spec = {
        Property.READING: {"READING", "READ", "PRREAD"},
        Property.SETTING: {"SETTING", "SET", "PRSET"},
        Property.STATUS: {"STATUS", "BASIC_STATUS", "STS", "PRBSTS"},
        Property.CONTROL: {"CONTROL", "BASIC_CONTROL", "CTRL", "PRBCTL"},
        Property.ANALOG: {"ANALOG", "ANALOG_ALARM", "AA", "PRANAB"},
        Property.DIGITAL: {"DIGITAL", "DIGITAL_ALARM", "DA", "PRDABL"},
        Property.DESCRIPTION: {"DESCRIPTION", "DESC", "PRDESC"},
        Property.INDEX: {"INDEX", "IDX", "PRIDX"},
        Property.LONG_NAME: {"LONG_NAME", "LNGNAM", "PRLNAM"},
        Property.ALARM_LIST_NAME: {"ALARM_LIST_NAME", "LSTNAM", "PRALNM"},
        Property.BIT_STATUS: {"BIT_STATUS", "BITSTATUS"},
    }
    assert {prop: {a for a, p in PROPERTY_ALIASES.items() if p is prop} for prop in Property} == spec


@pytest.mark.parametrize(("alias", "field"), sorted(FIELD_ALIASES.items()))
def test_every_field_alias(alias: str, field: Field) -> None:
    # after an explicit property: always a field
    assert parse(f"M:OUTTMP.STATUS.{alias.lower()}").field is field
    assert parse(f"M:OUTTMP.BIT_STATUS[0:1].{alias}").field is field
    # after a range without a property: a field
    assert parse(f"M|OUTTMP[2].{alias}").field is field
    if alias not in PROPERTY_ALIASES:  # otherwise the first word is the property
        assert parse(f"M|OUTTMP.{alias}").field is field
        assert parse(f"M|OUTTMP.{alias}{{0:4}}@I").field is field


def test_field_aliases() -> None:
    assert FIELD_ALIASES["MINIMUM"] is Field.MIN
    assert FIELD_ALIASES["MAXIMUM"] is Field.MAX
    assert FIELD_ALIASES["NOMINAL"] is Field.NOM
    assert FIELD_ALIASES["TOLERANCE"] is Field.TOL
    assert FIELD_ALIASES["ENABLE"] is Field.ALARM_ENABLE
    assert FIELD_ALIASES["STATUS"] is Field.ALARM_STATUS
    assert FIELD_ALIASES["FTD"] is Field.ALARM_FTD
    assert FIELD_ALIASES["VOLTS"] is Field.PRIMARY
    assert FIELD_ALIASES["COMMON"] is Field.SCALED
    # STATUS as the first word is the property; as the second word the alarm field
    assert parse("M@OUTTMP.STATUS").property is Property.STATUS
    assert parse("M@OUTTMP.ANALOG.STATUS").field is Field.ALARM_STATUS


def test_default_field_is_normalised_to_none() -> None:
    assert parse("M:OUTTMP.SCALED") == parse("M:OUTTMP")
    assert parse("M:OUTTMP.READING.COMMON").field is None
    assert parse("M_OUTTMP.SCALED").field is None
    assert parse("M@OUTTMP.ALL").field is None
    assert parse("M$OUTTMP.DIGITAL.ALL").field is None
    assert parse("M|OUTTMP.ALL").field is Field.ALL  # STATUS has no stated default: kept
    assert parse("M:OUTTMP.RAW").field is Field.RAW


def test_word_errors() -> None:
    assert _err("M:OUTTMP.FOO").reason == "unknown field 'FOO'"
    assert _err("M:OUTTMP.READING.FOO").position == 17
    assert "unknown property 'FOO'" in _err("M:OUTTMP.FOO.RAW").reason
    two_fields = _err("M:OUTTMP.RAW.SCALED")
    assert "not a property" in two_fields.reason
    assert two_fields.position == 12
    assert _err("M:OUTTMP.RAW[0:3].SCALED").position == 17
    assert _err("M:OUTTMP.").position == 9
    assert _err("M:OUTTMP[0].").position == 12
    assert _err("M:OUTTMP.READING.SETTING").reason == "unknown field 'SETTING'"
    assert _err("M:OUTTMP.READING.RAW.RAW").position == 20
    assert _err("M:OUTTMP.READING[0][1]").position == 19


# ---------------------------------------------------------------------------------------------
# Range


@pytest.mark.parametrize(
    ("text", "expected", "canonical_form"),
    [
        ("[5]", Range("array", 5, None, single=True), "[5]"),
        ("[0:10]", Range("array", 0, 10), "[0:10]"),
        ("[3:]", Range("array", 3, None), "[3:]"),
        ("[:7]", Range("array", None, 7), "[:7]"),
        ("[]", Range("array"), "[]"),
        ("[:]", Range("array"), "[]"),
        ("[4:4]", Range("array", 4, 4), "[4:4]"),
        ("{4}", Range("byte", 4, None, single=True), "{4}"),
        ("{4:8}", Range("byte", 4, 8), "{4:8}"),
        ("{4:}", Range("byte", 4, None), "{4:}"),
        ("{:8}", Range("byte", None, 8), "{:8}"),
        ("{}", Range("byte"), "{}"),
        ("{:}", Range("byte"), "{}"),
        ("{8:2}", Range("byte", 8, 2), "{8:2}"),  # offset 8, length 2
        ("[007]", Range("array", 7, None, single=True), "[7]"),
        ("[2147483647]", Range("array", 2**31 - 1, None, single=True), "[2147483647]"),
    ],
)
def test_range_forms(text: str, expected: Range, canonical_form: str) -> None:
    result = parse("M:OUTTMP" + text)
    assert result.range == expected
    assert result.canonical == "M:OUTTMP.READING" + canonical_form
    assert parse("M:OUTTMP.SETTING" + text + ".RAW@I").range == expected


def test_range_whole_and_single_are_distinct() -> None:
    assert Range("array").is_whole
    assert not Range("array", 1, None, single=True).is_whole
    assert parse("M:OUTTMP[1]") != parse("M:OUTTMP[1:]")
    assert parse("M:OUTTMP[1]") != parse("M:OUTTMP[1:1]")


@pytest.mark.parametrize(
    "text",
    [
        "[1:2:3]",
        "[-1]",
        "[a]",
        "[1",
        "[ 1]",
        "{1:2:3}",
        "{x}",
        "{1",
        "[1}",
        "[5:2]",  # end before start
        "[2147483648]",
        "[99999999999999999999]",
        "{0:2147483648}",
        "[1][2]",
        "[\u0661]",  # a non-ASCII digit
    ],
)
def test_bad_ranges(text: str) -> None:
    assert _err("M:OUTTMP" + text).position is not None


# ---------------------------------------------------------------------------------------------
# Events


@pytest.mark.parametrize(
    ("event", "period_us"),
    [
        ("P", 1_000_000),  # @P alone = 1000 ms
        ("p", 1_000_000),
        ("P,1000", 1_000_000),
        ("P,1000M", 1_000_000),
        ("P,1000m", 1_000_000),
        ("P,10H", 100_000),  # 10 Hz = 100 ms
        ("P,2S", 2_000_000),
        ("P,500U", 500),
        ("P,1K", 1_000),
        ("P,3H", 333_333),
        ("P,15h", 66_667),  # 66666.67 us, rounded
        ("P,2k", 500),
        ("P,0", 0),
        ("Q,250", 250_000),
        ("q,5S", 5_000_000),
        ("Q", 1_000_000),
        ("P,2147483647", 2_147_483_647_000),
    ],
)
def test_periodic_events_and_units(event: str, period_us: int) -> None:
    result = parse(f"M:OUTTMP@{event}").event
    assert result is not None
    assert result.kind == event[0].upper()
    assert result.period == period_us
    assert result.immediate is None
    assert not result.is_oneshot


def test_periodic_immediate_flag() -> None:
    for flag, value in (("T", True), ("true", True), ("TRUE", True), ("f", False), ("False", False)):
        event = parse(f"M:OUTTMP@P,1000,{flag}").event
        assert event is not None and event.immediate is value
    assert parse("M:OUTTMP@P,1000,T").canonical == "M:OUTTMP.READING@P,1000,TRUE"
    assert parse("M:OUTTMP@Q,10H,f").canonical == "M:OUTTMP.READING@Q,100,FALSE"


@pytest.mark.parametrize(
    "event",
    [
        "P,",
        "P,abc",
        "P,1000,yes",
        "P,1000,",
        "P,1000,T,1",
        "P,10X",
        "P,10MS",
        "P,-1",
        "P,0H",
        "P,0K",
        "P,1.5",
        "P,2147483648",
        "P,2147483647S",
        "P,99999999999999999999",
        "P1000",
        "PX",
        "P,,T",
    ],
)
def test_bad_periodic_events(event: str) -> None:
    assert _err(f"M:OUTTMP@{event}").position is not None


def test_clock_events() -> None:
    assert parse("M:OUTTMP@E,8F").event == Event("E", clock_event=0x8F)
    assert parse("M:OUTTMP@e,0f,h").event == Event("E", clock_event=0x0F, clock_type="H")
    assert parse("M:OUTTMP@E,02,S,5S").event == Event("E", clock_event=2, clock_type="S", delay=5_000_000)
    assert parse("M:OUTTMP@E,A9,E,250U").event == Event("E", clock_event=0xA9, clock_type="E", delay=250)
    assert parse("M:OUTTMP@E,8F,E,100").canonical == "M:OUTTMP.READING@E,8F,E,100"
    assert parse("M:OUTTMP@e,00ab,s").canonical == "M:OUTTMP.READING@E,AB,S"
    assert not parse("M:OUTTMP@E,8F").is_oneshot


@pytest.mark.parametrize(
    "event",
    ["E", "E,", "E,G1", "E,0F,B", "E,0F,H,", "E,0F,H,x", "E,0F,,100", "E,0F,H,100,1", "E,FFFFFFFFF", "E,0x0F"],
)
def test_bad_clock_events(event: str) -> None:
    assert _err(f"M:OUTTMP@{event}").position is not None


@pytest.mark.parametrize("op", ["=", "!=", "*", ">", "<", "<=", ">="])
def test_state_events(op: str) -> None:
    result = parse(f"M:OUTTMP@s,g_amanda,12,100,{op}")
    assert result.event == Event("S", device="G:AMANDA", value=12, delay=100_000, op=op)
    assert result.canonical == f"M:OUTTMP.READING@S,G:AMANDA,12,100,{op}"
    assert not result.is_oneshot
    # with an extra right after the operator
    with_extra = parse(f"M:OUTTMP@S,G:AMANDA,1,2S,{op}<-LOGGER:1:2")
    assert with_extra.event == Event("S", device="G:AMANDA", value=1, delay=2_000_000, op=op)
    assert with_extra.extra == Extra("LOGGER", ":1:2")


@pytest.mark.parametrize(
    "event",
    [
        "S",
        "S,G:AMANDA,1,100",
        "S,G:AMANDA,1,100,",
        "S,G:AMANDA,1,100,==",
        "S,G:AMANDA,1,100,=,1",
        "S,G:AMANDA,-1,100,=",
        "S,G:AMANDA,x,100,=",
        "S,G:AMANDA,1,x,=",
        "S,GA,1,100,=",
        "S,G:AMANDA.READING,1,100,=",
        "S,G*AMANDA,1,100,=",
        "S,,1,100,=",
        "S,G:" + "A" * 63 + ",1,100,=",
        "S,G:AMANDA,99999999999,100,=",
    ],
)
def test_bad_state_events(event: str) -> None:
    assert _err(f"M:OUTTMP@{event}").position is not None


def test_simple_events() -> None:
    for letter in "UuIiNn":
        event = parse(f"M:OUTTMP@{letter}").event
        assert event == Event(letter.upper())
        assert event is not None and event.is_oneshot is (letter.upper() in "IN")
    for bad in ("@N,1", "@NEVER", "@I,1", "@II", "@U,1", "@Immediate", "@", "@X", "@1", "@@I", "@I@I"):
        assert _err("M:OUTTMP" + bad).position is not None, bad


def test_no_event_and_default_event() -> None:
    assert parse("M:OUTTMP").event is None
    assert parse("M:OUTTMP@U").event == Event("U")
    assert not parse("M:OUTTMP").is_oneshot
    assert not parse("M:OUTTMP@U").is_oneshot
    assert parse("M:OUTTMP@U").canonical == "M:OUTTMP.READING@U"


def test_oneshot() -> None:
    assert is_oneshot("M:OUTTMP@I")
    assert is_oneshot("M:OUTTMP@n")
    assert parse("M:OUTTMP@I").is_oneshot
    for text in ("M:OUTTMP", "M:OUTTMP@U", "M:OUTTMP@P", "M:OUTTMP@Q,1", "M:OUTTMP@E,0F", "M:OUTTMP@S,G:A,1,1,*"):
        assert not is_oneshot(text), text
    assert Event("I").is_oneshot and Event("N").is_oneshot and not Event("P", period=1).is_oneshot
    with pytest.raises(DRFError):
        is_oneshot("garbage")


# ---------------------------------------------------------------------------------------------
# Extras


@pytest.mark.parametrize(
    "name", ["FTP", "LIVEDATA", "LOGGER", "LOGGERSINGLE", "LOGGERDURATION", "SRFILE", "SDAFILE", "REDIR", "MIRROR"]
)
def test_every_extra(name: str) -> None:
    assert parse(f"M:OUTTMP<-{name}").extra == Extra(name, "")
    assert parse(f"M:OUTTMP@P,1000<-{name.lower()}:1:2").extra == Extra(name, ":1:2")
    assert parse(f"M:OUTTMP<-{name}").canonical == f"M:OUTTMP.READING<-{name}"
    assert str(Extra(name, ":x")) == f"{name}:x"


def test_extra_parameters_are_kept_verbatim() -> None:
    result = parse("Z:ACLTST.READING@I<-LOGGER:2024-01-01 00:00:00:now")
    assert result.extra == Extra("LOGGER", ":2024-01-01 00:00:00:now")
    assert result.canonical == "Z:ACLTST.READING@I<-LOGGER:2024-01-01 00:00:00:now"
    assert parse("Z:ACLTST<-LOGGER[1,2]").extra == Extra("LOGGER", "[1,2]")
    assert parse("Z:ACLTST<-SRFILE:a<b").extra == Extra("SRFILE", ":a<b")


@pytest.mark.parametrize(
    ("text", "position"),
    [
        ("M:OUTTMP<-BOGUS", 10),
        ("M:OUTTMP<-", 10),
        ("M:OUTTMP<-:1", 10),
        ("M:OUTTMP<-LOGGERX", 10),
        ("M:OUTTMP<-LOGGER_2", 10),
        ("M:OUTTMP<-LOGGER<-LOGGER", 16),
        ("M:OUTTMP<-LOGGER:1<-2", 18),
        ("M:OUTTMP.FOO<-BOGUS", 9),  # errors come out left to right
    ],
)
def test_bad_extras(text: str, position: int) -> None:
    assert _err(text).position == position


# ---------------------------------------------------------------------------------------------
# Canonical form, write preparation, value types


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("M:OUTTMP", "M:OUTTMP.READING"),
        ("m_outtmp", "M:OUTTMP.SETTING"),
        ("M?OUTTMP", "M:OUTTMP.READING"),
        ("m:outtmp.read@p,1000", "M:OUTTMP.READING@P,1000"),
        ("M:OUTTMP.PRSET[0:10].volts@q,2s,t", "M:OUTTMP.SETTING[0:10].PRIMARY@Q,2000,TRUE"),
        ("M:OUTTMP.RAW[0:3]", "M:OUTTMP.READING[0:3].RAW"),
        ("M:OUTTMP.SCALED", "M:OUTTMP.READING"),
        ("M:OUTTMP@P,10H", "M:OUTTMP.READING@P,100"),
        ("M:OUTTMP@P,3H", "M:OUTTMP.READING@P,333333U"),
        ("M:OUTTMP@P,500U", "M:OUTTMP.READING@P,500U"),
        ("M:OUTTMP@P,2000U", "M:OUTTMP.READING@P,2"),
        ("M:OUTTMP@P", "M:OUTTMP.READING@P,1000"),
        ("M:OUTTMP@E,8f,e,1s", "M:OUTTMP.READING@E,8F,E,1000"),
        ("m@outtmp.max", "M:OUTTMP.ANALOG.MAX"),
        ("M:OUTTMP<-logger:1000:2000", "M:OUTTMP.READING<-LOGGER:1000:2000"),
    ],
)
def test_canonical(text: str, expected: str) -> None:
    assert canonical(text) == expected
    assert parse(text).canonical == expected
    assert str(parse(text)) == expected
    assert parse(expected) == parse(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("M:OUTTMP", "M:OUTTMP.SETTING@N"),
        ("M:OUTTMP@p,1000", "M:OUTTMP.SETTING@N"),
        ("m_outtmp", "M:OUTTMP.SETTING@N"),
        ("M:OUTTMP.READING[0:3].RAW@I", "M:OUTTMP.SETTING[0:3].RAW@N"),
        ("M|OUTTMP", "M:OUTTMP.CONTROL@N"),
        ("M:OUTTMP.STATUS.ON@I", "M:OUTTMP.CONTROL@N"),  # a status bit is read, not written
        ("M:OUTTMP.STATUS.RAW@I", "M:OUTTMP.CONTROL.RAW@N"),
        ("M&OUTTMP", "M:OUTTMP.CONTROL@N"),
        ("M@OUTTMP.MAX", "M:OUTTMP.ANALOG.MAX@N"),
        ("M$OUTTMP", "M:OUTTMP.DIGITAL@N"),
        ("M~OUTTMP", "M:OUTTMP.DESCRIPTION@N"),
    ],
)
def test_prepare_for_write(text: str, expected: str) -> None:
    assert prepare_for_write(text) == expected
    assert parse(text).for_write().canonical == expected
    written = parse(text).for_write()
    assert written.event == Event("N") and written.is_oneshot


def test_drf_is_frozen_and_slotted() -> None:
    result = parse("M:OUTTMP@I")
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.device = "G:AMANDA"  # type: ignore[misc]
    for value in (result, result.event, parse("M:OUTTMP[1]").range, parse("M:OUTTMP<-FTP").extra):
        assert not hasattr(value, "__dict__")
        assert dataclasses.is_dataclass(value)
    assert hash(parse("m:outtmp@i")) == hash(result)
    assert {parse("M:OUTTMP"), parse("m:outtmp.reading.scaled"), parse("M?OUTTMP")} == {parse("M:OUTTMP")}
    assert type(result) is DRF and type(result.event) is Event


def test_parsed_values_pickle() -> None:
    result = parse("M|OUTTMP.STATUS[0:3].TEXT@S,G:AMANDA,1,100,<=<-LOGGER:1:2")
    assert pickle.loads(pickle.dumps(result)) == result


def test_parse_cached() -> None:
    first = parse_cached("M:OUTTMP@p,1000")
    assert parse_cached("M:OUTTMP@p,1000") is first
    assert first == parse("M:OUTTMP@p,1000")
    info = drf_module._parse_lru.cache_info()
    assert info.maxsize == 4096
    with pytest.raises(DRFError):
        parse_cached("M:OUTTMP.FOO")


def test_module_functions_raise_drf_error() -> None:
    for function in (canonical, is_oneshot, prepare_for_write):
        with pytest.raises(DRFError):
            function("AB")


# ---------------------------------------------------------------------------------------------
# get_device_name


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("m_outtmp.setting@p,1000", "M:OUTTMP"),
        ("M:OUTTMP", "M:OUTTMP"),
        ("M@OUTTMP.MAX@I", "M:OUTTMP"),
        ("z|acltst[0:2]<-LOGGER:1:2", "Z:ACLTST"),
    ],
)
def test_get_device_name(text: str, expected: str) -> None:
    assert get_device_name(text) == expected
    assert guess_device_name(text) == expected


@pytest.mark.parametrize(
    ("text", "name", "guess"),
    [
        # not DRFs (no ACNET device name first): the name as written, up to its field or event
        ("weird name", "weird name", "WEIRD"),
        ("dev:pv_name.VAL@p,1000", "dev:pv_name", "DEV:PV_NAME"),
        ("XF:31IDA-OP{Tbl-Ax:X1}Mtr.RBV<-LOGGER", "XF:31IDA-OP{Tbl-Ax:X1}Mtr", "XF:31IDA-OP"),
        # an ACNET name followed by what no DRF continues with
        ("Z:ACL TST", "Z:ACL TST", "Z:ACL"),
        ("M:OUT\x00TMP", "M:OUT\x00TMP", "M:OUTTMP"),
        ("m:outtmp\n", "m:outtmp\n", "M:OUTTMP"),
    ],
)
def test_get_device_name_passes_other_names_through(text: str, name: str, guess: str) -> None:
    assert get_device_name(text) == name
    assert guess_device_name(text) == guess


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("m_outtmp.foo", "M:OUTTMP"),
        ("M@OUTTMP@X", "M:OUTTMP"),
        ("M:OUTTMP[", "M:OUTTMP"),
        ("  m:outtmp@x  ", "M:OUTTMP"),  # another name, but with an event no DRF has
        ("dev:pv@X", "DEV:PV"),
        ("AB", "AB"),
        ("", ""),
    ],
)
def test_guess_device_name_guesses_where_get_device_name_refuses(text: str, expected: str) -> None:
    assert guess_device_name(text) == expected
    with pytest.raises(ValueError):
        get_device_name(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("M:OUTTMP", "M:OUTTMP.SETTING@N"),
        ("hello world", "hello world@N"),
        ("dev:pv.VAL@p,1000", "dev:pv.VAL@N"),
        ("hello<-LOGGER", "hello@N<-LOGGER"),
    ],
)
def test_prepare_for_write_passes_other_names_through(text: str, expected: str) -> None:
    assert drf_utils_prepare_for_write(text) == expected


@pytest.mark.parametrize("text", ["M:OUTTMP.FOO", "M:OUTTMP@X", "x", ""])
def test_prepare_for_write_refuses_malformed_drfs(text: str) -> None:
    with pytest.raises(ValueError):
        drf_utils_prepare_for_write(text)
    with pytest.raises(DRFError):
        prepare_for_write(text)  # the gateway's: DRFs only


@pytest.mark.parametrize("value", [None, 3, b"M:OUTTMP", ["M:OUTTMP"], object()])
def test_guess_device_name_never_raises(value: object) -> None:
    assert guess_device_name(value) == ""


# ---------------------------------------------------------------------------------------------
# Property-based tests

# Kept small enough that the whole file runs in a few seconds.
_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

_NAME_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_:-"
_QUALIFIERS = ":?_|&@$~^#!"
_UNITS = ["", "M", "m", "S", "s", "U", "u", "H", "h", "K", "k"]


_CASE = st.sampled_from([str.upper, str.lower, str.title])


def _words(words: list[str]) -> st.SearchStrategy[str]:
    """One of ``words`` in upper, lower or title case."""
    return st.tuples(st.sampled_from(words), _CASE).map(lambda pair: pair[1](pair[0]))


_PROPERTY_WORDS = _words(sorted(PROPERTY_ALIASES))
_FIELD_WORDS = _words(sorted(FIELD_ALIASES))
_FIRST_POSITION_FIELD_WORDS = _words(sorted(a for a in FIELD_ALIASES if a not in PROPERTY_ALIASES))
_EXTRA_WORDS = _words(sorted(drf_module.EXTRA_NAMES))


@st.composite
def _device(draw: st.DrawFn) -> str:
    first = draw(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0#"))
    qualifier = draw(st.sampled_from(_QUALIFIERS))
    if draw(st.integers(0, 9)) == 0:  # now and then the longest name, else short ones (cheaper to draw)
        return first + qualifier + draw(st.sampled_from(_NAME_CHARS)) * 62
    return first + qualifier + draw(st.text(_NAME_CHARS, min_size=1, max_size=10))


def _number(max_value: int = 2**31 - 1) -> st.SearchStrategy[str]:
    return st.one_of(
        st.integers(0, 5000).map(str),
        st.integers(0, max_value).map(str),
        st.integers(0, 99).map(lambda n: "00" + str(n)),
    )


@st.composite
def _time(draw: st.DrawFn) -> str:
    unit = draw(st.sampled_from(_UNITS))
    if unit in ("S", "s"):
        return draw(_number(2_000_000)) + unit
    if unit in ("H", "h", "K", "k"):
        return str(draw(st.integers(1, 2**31 - 1))) + unit
    return draw(_number()) + unit


@st.composite
def _range(draw: st.DrawFn) -> str:
    opening, closing = draw(st.sampled_from([("[", "]"), ("{", "}")]))
    a = draw(st.integers(0, 2**31 - 1))
    b = draw(st.integers(0, 2**31 - 1))
    if opening == "[" and b < a:
        a, b = b, a
    inner = draw(st.sampled_from(["", ":", f"{a}", f"{a}:{b}", f"{a}:", f":{b}"]))
    return opening + inner + closing


@st.composite
def _event(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from("UINPQES"))
    letter = draw(st.sampled_from([kind, kind.lower()]))
    if kind in "UIN":
        return "@" + letter
    if kind in "PQ":
        if draw(st.booleans()):
            return "@" + letter
        text = f"@{letter},{draw(_time())}"
        if draw(st.booleans()):
            text += "," + draw(st.sampled_from(["T", "t", "TRUE", "true", "F", "f", "FALSE", "False"]))
        return text
    if kind == "E":
        text = f"@{letter},{draw(st.integers(0, 2**31 - 1)):{draw(st.sampled_from(['x', 'X', '04X']))}}"
        if draw(st.booleans()):
            text += "," + draw(st.sampled_from("HSEhse"))
            if draw(st.booleans()):
                text += "," + draw(_time())
        return text
    op = draw(st.sampled_from(["=", "!=", "*", ">", "<", "<=", ">="]))
    return f"@{letter},{draw(_device())},{draw(_number())},{draw(_time())},{op}"


@st.composite
def _extra(draw: st.DrawFn) -> str:
    name = draw(_EXTRA_WORDS)
    params = draw(st.one_of(st.just(""), st.text(":[]0123456789 ,.-_ABCxyz<>=", max_size=30)))
    while "<-" in params:  # a second '<-' is an error
        params = params.replace("<-", "<")
    if params and params[0] not in ":[":
        params = ":" + params
    return "<-" + name + params


@st.composite
def valid_drfs(draw: st.DrawFn) -> str:
    text = draw(_device())
    shape = draw(st.sampled_from(["plain", "property", "field-first", "field-last"]))
    rng = draw(st.one_of(st.just(""), _range()))
    if shape == "plain":
        text += rng
    elif shape == "property":
        text += "." + draw(_PROPERTY_WORDS) + rng
        if draw(st.booleans()):
            text += "." + draw(_FIELD_WORDS)
    elif shape == "field-first":
        text += "." + draw(_FIRST_POSITION_FIELD_WORDS) + rng
    else:
        text += rng + "." + draw(_FIELD_WORDS)
    if draw(st.booleans()):
        text += draw(_event())
    if draw(st.booleans()):
        text += draw(_extra())
    return text


_FRAGMENTS = [
    "M", "m", "Z", "0", "#", ":", "?", "_", "|", "&", "@", "$", "~", "^", "!", "OUTTMP", "G:AMANDA", ".",
    "READING", "SETTING", "STATUS", "RAW", "SCALED", "ALL", "FOO", "[", "]", "{", "}", "1", "10", "0",
    "2147483648", "99999999999999", "-", ",", "P", "p", "Q", "E", "S", "I", "N", "U", "H", "K", "T", "TRUE",
    "F", "8F", "=", "!=", "<=", ">=", "<", ">", "*", "<-", "LOGGER", "FTP", " ", "\n", "\x00", "\t", "\u00e9",
    "A" * 62, "A" * 63,
]  # fmt: skip


_FRAGMENT = st.sampled_from(_FRAGMENTS)
_MUTATION = st.tuples(
    st.floats(0, 1, exclude_max=True), st.sampled_from(["delete", "insert", "replace", "dup"]), _FRAGMENT
)


def _mutated(text: str, data: st.DataObject) -> str:
    """``text`` with one character deleted, replaced or followed by a fragment, or its tail doubled."""
    if not text:
        return text
    where, action, piece = data.draw(_MUTATION)
    i = int(where * len(text))
    if action == "delete":
        return text[:i] + text[i + 1 :]
    if action == "insert":
        return text[:i] + piece + text[i:]
    if action == "replace":
        return text[:i] + piece + text[i + 1 :]
    return text[:i] + text[i:] + text[i:]


_ANY_TEXT = st.one_of(
    st.text(max_size=80),
    st.text(st.characters(min_codepoint=0, max_codepoint=127), max_size=80),
    st.lists(st.sampled_from(_FRAGMENTS), max_size=25).map("".join),
    st.text(min_size=500, max_size=600),
)


def _check_any(text: str) -> None:
    try:
        result = parse(text)
    except DRFError as error:
        assert error.drf == text
        assert error.position is None or 0 <= error.position <= len(text)
        assert isinstance(error.reason, str) and error.reason
        assert error.reason != "malformed event"  # the event fast path and its diagnosis agree
        assert isinstance(guess_device_name(text), str)
        return
    # anything that parses must round-trip through its canonical form
    assert parse(result.canonical) == result
    assert get_device_name(text) == result.device


@_SETTINGS
@given(_ANY_TEXT)
def test_any_text_raises_only_drf_error(text: str) -> None:
    _check_any(text)


@_SETTINGS
@given(valid_drfs(), st.data())
def test_mutated_drfs_raise_only_drf_error(text: str, data: st.DataObject) -> None:
    _check_any(_mutated(_mutated(text, data), data))


@_SETTINGS
@given(valid_drfs())
def test_valid_drfs_round_trip(text: str) -> None:
    result = parse(text)
    form = result.canonical
    assert parse(form) == result
    assert parse(form).canonical == form  # idempotent
    assert canonical(form) == form
    assert get_device_name(text) == result.device
    assert result.device == result.device.upper() and result.device[1] == ":"
    written = prepare_for_write(text)
    assert parse(written) == result.for_write()
    assert prepare_for_write(written) == written
