"""The envelope's derived event ids and timestamps: the fast paths give exactly what the standard
library's uuid5 and strftime give (an id derived from a cause must never change between versions:
JetStream drops a re-published outcome by it)."""

from __future__ import annotations

import time
import uuid

from hypothesis import given
from hypothesis import strategies as st

from contracts.envelope import _ID_NAMESPACE, derived_id, now_rfc3339


@given(st.text(max_size=300))
def test_derived_id_is_uuid5_of_the_name(name):
    assert derived_id(name) == str(uuid.uuid5(_ID_NAMESPACE, name))


@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_now_rfc3339_formats_any_time_as_before(ts):
    secs = int(ts)
    expected = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{int((ts - secs) * 1e6):06d}Z"
    assert now_rfc3339(ts) == expected
