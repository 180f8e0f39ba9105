"""Client frames are checked once at the edge: every malformed frame is a FrameError."""

from __future__ import annotations

import json

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.protocol.frames import ENCODABLE_DEPTH, FrameError, FrameLimits, decode


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
    (b'{"type":"cancel","id":7,"task":"t","key":""}', "characters", 7),
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


def _create(**fields: object) -> bytes:
    frame = {"type": "create", "id": 1, "kind": "demo", "scope": "project:1", "input": {}, **fields}
    return json.dumps(frame).encode()


def _nested(depth: int) -> object:
    value: object = {}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


@pytest.mark.parametrize(("raw", "field"), [
    (_create(scope="project:\u00001"), "scope"),
    (_create(kind="de\u0000mo"), "kind"),
    (_create(labels=["ok", "b\u0000d"]), "labels"),
    (_create(input={"name": "x\u0000y"}), "input"),
    (_create(input={"k\u0000": 1}), "input"),
    (_create(depends_on=["tsk_\u0000"]), "depends_on"),
    (_create(key="k\u0000"), "key"),
    (b'{"type":"get","id":1,"task":"tsk_\\u0000"}', "task"),
    (b'{"type":"cancel","id":1,"task":"t","reason":"no\\u0000"}', "reason"),
    (b'{"type":"subscribe","id":1,"channel":"scope:a\\u0000"}', "channel"),
    (b'{"type":"subscribe","id":1,"channel":"all","since":"' + b"0" * 31 + b'\\u0000"}', "since"),
    (b'{"type":"list","id":1,"cursor":"c\\u0000"}', "cursor"),
    (b'{"type":"hello","id":1,"token":"t\\u0000"}', "token"),
    (_create(priority=2**31), "priority"),
    (_create(priority=-(2**40)), "priority"),
    (_create(priority=1.5), "priority"),
    (_create(timeout_s=1e300), "timeout_s"),
    (_create(timeout_s=-1), "timeout_s"),
    (_create(timeout_s=0), "timeout_s"),
    (_create(input=_nested(250)), "input"),
    (_create(input=_nested(600)), "input"),
    (_create(input=_nested(33)), "input"),
    (_create(input={"blob": "x" * 70_000}), "input"),
    (_create(labels=["l"] * 33), "labels"),
    (_create(scope="s" * 201), "scope"),
    (b'{"type":"subscribe","id":1,"channel":"all","since":"' + b"f" * 32 + b'"}', "since"),
    (b'{"type":"subscribe","id":1,"channel":"all","since":"' + b"-" + b"0" * 31 + b'"}', "since"),
    (b'{"type":"subscribe","id":1,"channel":"all","since":"' + b"0_" * 16 + b'"}', "since"),
    (b'{"type":"list","id":1,"status":["running","nope"]}', "status"),
    (b'{"type":"list","id":1,"limit":501}', "limit"),
    (b'{"type":"history","id":1,"task":"t","after":-1}', "after"),
    (b'{"type":"history","id":1,"task":"t","after":9223372036854775808}', "after"),
    (b'{"type":"answer","id":1,"task":"t","question":"q_1","answer":"\\u0000"}', "answer"),
])
def test_hostile_values_are_refused_naming_their_field(raw: bytes, field: str) -> None:
    """NUL, out-of-range numbers, deep or large JSON and bad positions are bad_request
    naming the field, before anything runs (never an internal error further in)."""
    with pytest.raises(FrameError) as caught:
        decode(raw)
    assert f"`{field}`" in str(caught.value)
    assert caught.value.id == 1


def test_values_at_the_limits_are_accepted() -> None:
    """The documented limits themselves pass: 32 levels, 30 days, int16 priorities."""
    request = decode(_create(input=_nested(32), timeout_s=30 * 24 * 3600, priority=-32768,
                             labels=["l"] * 32))
    assert request.fields["timeout_s"] == 30 * 24 * 3600
    since = decode(b'{"type":"subscribe","id":1,"channel":"all","since":"' + b"7" + b"f" * 15
                   + b"7" + b"f" * 15 + b'"}')
    assert since.fields["since"] == (2**63 - 1) << 64 | (2**63 - 1)


def test_a_decoded_request_carries_only_the_known_fields() -> None:
    """Unknown fields are ignored (PROTOCOL.md): nothing unchecked reaches a handler."""
    request = decode(_create(extra={"deep": _nested(600)}))
    assert "extra" not in request.fields and request.fields["kind"] == "demo"


def test_the_depth_limit_is_the_one_named_up_to_what_the_encoder_can_encode() -> None:
    """At the deepest limit allowed (254, orjson's), 254 levels are accepted and stored
    input can be encoded again; 255 are refused naming that limit. A deeper limit cannot
    be set: the message would name a depth the server cannot honour."""
    deepest = FrameLimits(max_input_bytes=1 << 20, max_json_depth=ENCODABLE_DEPTH)
    accepted = decode(_create(input=_nested(ENCODABLE_DEPTH)), deepest)
    assert orjson.loads(orjson.dumps(accepted.fields["input"])) == _nested(ENCODABLE_DEPTH)
    with pytest.raises(FrameError, match=f"`input` is nested more than {ENCODABLE_DEPTH} levels"):
        decode(_create(input=_nested(ENCODABLE_DEPTH + 1)), deepest)
    with pytest.raises(ValueError, match="max_json_depth"):
        FrameLimits(max_json_depth=ENCODABLE_DEPTH + 1)


def test_a_deep_input_is_refused_for_its_depth_and_a_large_one_for_its_size() -> None:
    """Each limit names itself: depth (also past what orjson encodes) before size, and
    the size message gives the input's encoded size."""
    with pytest.raises(FrameError, match="`input` is nested more than 32 levels"):
        decode(_create(input={"blob": "x" * 70_000, "deep": _nested(600)}))
    with pytest.raises(FrameError, match=r"at most 65536 bytes of JSON \(it is 70011\)"):
        decode(_create(input={"blob": "x" * 70_000}))
