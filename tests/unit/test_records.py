"""Model records' JSON: the hand-written encoder agrees with the dataclass, and round-trips."""

import json
from dataclasses import asdict, fields

from hypothesis import given
from hypothesis import strategies as st

from modelmesh.types import LoadFailure, ModelInfo, ModelRecord

text = st.text(max_size=12)
ms = st.integers(0, 2**53)
records = st.builds(
    ModelRecord,
    info=st.builds(ModelInfo, type=text, path=text, key=text),
    registered_ms=ms,
    last_used_ms=ms,
    copies=st.dictionaries(text, ms, max_size=4),
    failures=st.dictionaries(text, st.builds(LoadFailure, time_ms=ms, message=text), max_size=3),
    refs=st.integers(0, 100),
    auto_delete=st.booleans(),
    min_copies=st.integers(0, 1000),
    all_pods=st.booleans(),
    pin_labels=st.lists(text, max_size=3).map(tuple),
    use_count=st.floats(0, 1e6, allow_nan=False),
    use_count_ms=ms,
    long_use=st.floats(0, 1e6, allow_nan=False),
    long_use_ms=ms,
)


@given(records)
def test_to_json_writes_every_field_as_asdict_would_and_round_trips(record):
    assert record.to_json() == json.dumps(asdict(record), separators=(",", ":")).encode()
    assert ModelRecord.from_json(record.to_json()) == record


def test_the_encoder_knows_every_field():
    written = json.loads(ModelRecord(ModelInfo("onnx", "/m"), 1).to_json())
    assert set(written) == {f.name for f in fields(ModelRecord)}


def test_a_record_written_before_use_counts_reads_with_none():
    old = b'{"info":{"type":"onnx","path":"/m","key":""},"registered_ms":5,"copies":{"pod-a":7}}'
    record = ModelRecord.from_json(old)
    assert (record.use_count, record.use_count_ms, record.copies) == (0.0, 0, {"pod-a": 7})
    assert (record.long_use, record.long_use_ms) == (0.0, 0)
