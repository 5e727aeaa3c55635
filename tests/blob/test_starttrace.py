"""The start trace format: first access order, runs, canonical bytes, and bounded, strict parsing."""

from __future__ import annotations

import json

import pytest

from bdserver.blob.starttrace import MAX_CHUNKS, MAX_TRACE_BYTES, StartTrace, TraceRun
from bdserver.errors import FormatError

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64


def test_accesses_become_runs_in_first_access_order() -> None:
    t = StartTrace.from_accesses([(A, 3, 0), (A, 4, 1), (B, 0, 2), (A, 3, 5), (A, 5, 6), (B, 1, 7), (A, 9, 9)])
    assert list(t.chunks()) == [(A, 3), (A, 4), (B, 0), (A, 5), (B, 1), (A, 9)]  # the second (A, 3) is dropped
    assert t.runs == [TraceRun(A, 3, 2, 0), TraceRun(B, 0, 1, 2), TraceRun(A, 5, 1, 6), TraceRun(B, 1, 1, 7),
                      TraceRun(A, 9, 1, 9)]
    assert len(t) == 6 and t.blobs() == [A, B] and t.per_blob() == {A: [3, 4, 5, 9], B: [0, 1]}


def test_round_trip_is_canonical() -> None:
    t = StartTrace.from_accesses([(B, 7, 0), (A, 0, 12), (A, 1, 12), (A, 2, 13)])
    data = t.to_bytes()
    assert data == b'{"blobs":["%s","%s"],"runs":[[0,7,1,0],[1,0,3,12]],"version":1}' % (B.encode(), A.encode())
    assert StartTrace.parse(data) == t and StartTrace.parse(data).to_bytes() == data


@pytest.mark.parametrize("doc, match", [
    ({"version": 2, "blobs": [], "runs": []}, "not a version 1"),
    ({"version": 1, "blobs": [A], "runs": [[1, 0, 1, 0]]}, "out of range"),  # no blob 1
    ({"version": 1, "blobs": [A], "runs": [[0, -1, 1, 0]]}, "out of range"),
    ({"version": 1, "blobs": [A], "runs": [[0, 0, 0, 0]]}, "out of range"),  # empty run
    ({"version": 1, "blobs": [A], "runs": [[0, 0, 1, -5]]}, "out of range"),
    ({"version": 1, "blobs": [A], "runs": [[0, 0, 1]]}, "is not \\[blob, first, count, ms\\]"),
    ({"version": 1, "blobs": [A], "runs": [[0, 0, True, 0]]}, "is not \\[blob, first, count, ms\\]"),
    ({"version": 1, "blobs": ["sha256:xyz"], "runs": []}, "invalid digest"),
    ({"version": 1, "blobs": [A], "runs": [[0, 0, MAX_CHUNKS + 1, 0]]}, "more than"),
    ({"version": 1, "blobs": A, "runs": []}, "must be lists"),
])
def test_malformed_traces_are_refused(doc: dict, match: str) -> None:
    with pytest.raises(FormatError, match=match):
        StartTrace.parse(json.dumps(doc).encode())


def test_oversized_and_non_json_traces_are_refused() -> None:
    with pytest.raises(FormatError, match=f"at most {MAX_TRACE_BYTES}"):
        StartTrace.parse(b" " * (MAX_TRACE_BYTES + 1))
    with pytest.raises(FormatError, match="not JSON"):
        StartTrace.parse(b"\xff{")
