"""Client frames are checked once at the edge: every malformed frame is a FrameError."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.frames import FrameError, decode


def test_a_valid_create_decodes() -> None:
    """A create with its required fields decodes with its id."""
    request = decode(b'{"type":"create","id":"a","kind":"demo","scope":"p","input":{}}')
    assert (request.type, request.id, request.fields["kind"]) == ("create", "a", "demo")


@pytest.mark.parametrize(("raw", "message", "id_"), [
    (b"{", "invalid JSON", None),
    (b"[1]", "JSON object", None),
    (b'{"id":1}', "type", 1),
    (b'{"type":"nope","id":2}', "unknown", 2),
    (b'{"type":"get"}', "id", None),
    (b'{"type":"get","id":3}', "task", 3),
    (b'{"type":"get","id":4,"task":5}', "string", 4),
    (b'{"type":"create","id":5,"kind":"k","scope":"s","input":[]}', "object", 5),
    (b'{"type":"history","id":6,"task":"t","after":true}', "integer", 6),
    (b'{"type":"cancel","id":7,"task":"t","key":""}', "chars", 7),
    (b'{"type":"ping","id":"' + b"x" * 65 + b'"}', "id", None),
])
def test_malformed_frames_are_refused_with_the_id_when_readable(
        raw: bytes, message: str, id_: object) -> None:
    """Each way a frame can be wrong names the problem, echoing a readable id."""
    with pytest.raises(FrameError) as caught:
        decode(raw)
    assert message in str(caught.value) and caught.value.id == id_


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                           | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


@given(st.dictionaries(st.sampled_from(["type", "id", "task", "kind", "scope", "input", "channel",
                                        "since", "key", "limit"]), json_values, max_size=6)
       | st.binary(max_size=40).map(lambda b: b))
def test_any_input_decodes_or_raises_frame_error(frame: object) -> None:
    """Fuzz: arbitrary frames never raise anything but FrameError."""
    raw = frame if isinstance(frame, bytes) else json.dumps(frame).encode()
    try:
        decode(raw)
    except FrameError:
        pass
