"""The contract's topics: built and read back by the same module."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meterproof.schemas import topics

METER_IDS = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)


@given(METER_IDS)
def test_a_readings_topic_names_its_meter(meter_id: str) -> None:
    assert topics.meter_of_readings(topics.readings(meter_id)) == meter_id
    assert topics.meter_of_readings(topics.receipts(meter_id)) is None
    assert topics.meter_of_readings(topics.verified(meter_id)) is None


@pytest.mark.parametrize(
    "topic", ["meters//readings", "meters/a/b/readings", "meters/a/readings/x", "Meters/a/readings"]
)
def test_other_shapes_name_no_meter(topic: str) -> None:
    assert topics.meter_of_readings(topic) is None


def test_filters_match_the_topics_they_stand_for() -> None:
    assert topics.READINGS_FILTER.replace("+", "m1") == topics.readings("m1")
    assert topics.RECEIPTS_FILTER.replace("+", "m1") == topics.receipts("m1")
    assert topics.VERIFIED_FILTER.replace("+", "m1") == topics.verified("m1")
    assert topics.shared("g", topics.READINGS_FILTER) == "$share/g/meters/+/readings"
