"""Go durations: what Atlantis users write is what we read, and what we print reads back."""

from __future__ import annotations

import re
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from enhanced_locking.durations import (
    DURATION_FORM,
    DURATION_PATTERN,
    Duration,
    format_duration,
    parse_duration,
)


@pytest.mark.parametrize(("text", "value"), [
    ("0", timedelta(0)),
    ("0s", timedelta(0)),
    ("30s", timedelta(seconds=30)),
    ("2m", timedelta(minutes=2)),
    ("1h30m", timedelta(hours=1, minutes=30)),
    ("1h0m0s", timedelta(hours=1)),
    ("90s", timedelta(seconds=90)),
    ("1.5h", timedelta(minutes=90)),
    ("250ms", timedelta(milliseconds=250)),
    ("1500us", timedelta(microseconds=1500)),
    ("1500µs", timedelta(microseconds=1500)),
    ("2000ns", timedelta(microseconds=2)),
    ("24h", timedelta(days=1)),
])
def test_go_durations_parse(text: str, value: timedelta) -> None:
    assert parse_duration(text) == value


@pytest.mark.parametrize("text", ["", "30", "s", "5 m", "-5s", "+5s", "1d", "5m3", "m5", "1.5.5s",
                                  " 5m ", " 1s", "1s\n", "\u0661s", "\uff15m", ".5s", "1.s"])
def test_anything_else_is_refused_naming_the_accepted_form(text: str) -> None:
    with pytest.raises(ValueError, match="a Go duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["30s", "1h30m", "1.5h", "250ms", "1500\u00b5s", "0"])
def test_the_parser_takes_exactly_what_the_published_pattern_allows(text: str) -> None:
    assert re.fullmatch(DURATION_PATTERN, text)
    parse_duration(text)


@pytest.mark.parametrize(("value", "text"), [
    (timedelta(0), "0s"),
    (timedelta(seconds=30), "30s"),
    (timedelta(minutes=5), "5m"),
    (timedelta(hours=1, minutes=30), "1h30m"),
    (timedelta(seconds=90), "1m30s"),
    (timedelta(milliseconds=200), "200ms"),
    (timedelta(milliseconds=1500), "1.5s"),
    (timedelta(hours=26, seconds=1, milliseconds=500), "26h1.5s"),
    (timedelta(microseconds=1500), "1.5ms"),
    (timedelta(microseconds=7), "7µs"),
])
def test_durations_are_printed_like_go_without_zero_units(value: timedelta, text: str) -> None:
    assert format_duration(value) == text


durations = st.builds(timedelta, microseconds=st.integers(min_value=0, max_value=10**14))


@given(durations)
def test_every_duration_reads_back_from_how_it_is_printed(value: timedelta) -> None:
    text = format_duration(value)
    assert parse_duration(text) == value
    assert re.fullmatch(DURATION_PATTERN, text)


@given(st.lists(st.tuples(st.integers(0, 10**5), st.sampled_from(["h", "m", "s", "ms", "us"])),
                min_size=1, max_size=4))
def test_written_durations_read_as_the_sum_of_their_parts(
    parts: list[tuple[int, str]]
) -> None:
    scale = {"h": 3600 * 10**6, "m": 60 * 10**6, "s": 10**6, "ms": 10**3, "us": 1}
    text = "".join(f"{number}{unit}" for number, unit in parts)
    expected = timedelta(microseconds=sum(number * scale[unit] for number, unit in parts))
    assert parse_duration(text) == expected
    assert parse_duration(format_duration(expected)) == expected


def test_a_duration_longer_than_go_allows_is_refused_not_crashed() -> None:
    assert parse_duration("2562047h") == timedelta(hours=2562047)
    with pytest.raises(ValueError, match="at most 2562047h"):
        parse_duration("99999999999999999h")


class _Model(BaseModel):
    wait: Duration


def test_a_duration_field_reads_go_text_and_writes_it_back_in_json() -> None:
    model = _Model.model_validate({"wait": "1m30s"})
    assert model.wait == timedelta(seconds=90)
    assert model.model_dump_json() == '{"wait":"1m30s"}'


@pytest.mark.parametrize("value", [30, 1.5])
def test_a_bare_number_is_refused_because_its_unit_is_unknown(value: float) -> None:
    with pytest.raises(ValidationError, match="add a unit"):
        _Model.model_validate({"wait": value})


def test_the_accepted_form_names_examples() -> None:
    assert "30s" in DURATION_FORM and "1h30m" in DURATION_FORM
