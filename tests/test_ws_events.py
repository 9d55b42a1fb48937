"""Unit tests of the pure WebSocket event handling (addon/metering/ws_events.py)."""

from __future__ import annotations

import json

from addon.metering import ws_events as ws


def frame(obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def test_sniff_reads_the_head_and_ignores_deltas():
    assert ws.sniff_type(frame({"type": "response.output_text.delta", "delta": "x"}), ws.SERVER_EVENTS) is None
    assert ws.sniff_type(frame({"type": "response.completed"}), ws.SERVER_EVENTS) == "response.completed"
    # type not first: every "type" is looked at, then the parse keeps only the top-level one
    data = frame({"item": {"type": "response.create"}, "type": "response.steer"})
    kind = ws.sniff_type(data, ws.CLIENT_EVENTS)
    assert kind == "response.create"
    assert ws.parse_event(data, kind, ws.CLIENT_EVENTS) == (None, None)
    assert ws.sniff_type(b"not json", ws.SERVER_EVENTS) is None


def test_large_terminal_event_keeps_usage_without_a_full_parse():
    usage = {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}
    big = frame({"type": "response.completed", "response": {"id": "resp_big", "output": "x" * (5 << 20),
                                                             "usage": usage}})
    kind, obj = ws.parse_event(big, "response.completed", ws.SERVER_EVENTS)
    assert kind == "response.completed" and obj["response"]["usage"] == usage and obj["response"]["id"] == "resp_big"


def _created(rid, lane=None):
    event = {"type": "response.created", "response": {"id": rid, "status": "in_progress", "model": "gpt-5"}}
    if lane:
        event["stream_id"] = lane
    return event


def _completed(rid, tokens, lane=None):
    event = {"type": "response.completed", "response": {"id": rid, "status": "completed", "model": "gpt-5",
                                                         "usage": {"input_tokens": tokens, "output_tokens": 1}}}
    if lane:
        event["stream_id"] = lane
    return event


def test_lanes_are_matched_by_stream_id_not_order():
    tracker = ws.SocketTracker(ws.RESPONSES)
    a = tracker.client_event("response.create", {"type": "response.create", "stream_id": "a"}, 10, 1.0)
    b = tracker.client_event("response.create", {"type": "response.create", "stream_id": "b"}, 10, 1.0)
    tracker.sent(a)
    tracker.sent(b)
    assert tracker.server_event("response.created", _created("resp_b", "b"), 2.0) == []
    assert tracker.server_event("response.created", _created("resp_a", "a"), 3.0) == []
    assert tracker.server_event("response.completed", _completed("resp_a", 7, "a"), 4.0) == [a]
    assert a.facts.usage.input_tokens == 7 and a.first_event == 3.0
    assert tracker.server_event("response.completed", _completed("resp_b", 9, "b"), 5.0) == [b]
    assert b.facts.usage.input_tokens == 9 and tracker.in_flight == 0


def test_error_and_close():
    tracker = ws.SocketTracker(ws.RESPONSES)
    p = tracker.client_event("response.create", {"type": "response.create"}, 10, 1.0)
    tracker.sent(p)
    # an error for no response in flight is nobody's
    done = tracker.server_event("error", {"type": "error", "error": {"message": "boom", "code": "x"}}, 2.0)
    assert done == [p] and p.outcome == "error" and "boom" in p.error
    assert tracker.server_event("error", {"type": "error", "error": {"message": "later"}}, 3.0) == []
    q = tracker.client_event("response.create", {"type": "response.create"}, 10, 4.0)
    tracker.sent(q)
    tracker.server_event("response.created", _created("resp_q"), 5.0)
    assert tracker.close(6.0) == [q] and q.outcome == "aborted"


def test_realtime_response_done_and_server_started_responses():
    tracker = ws.SocketTracker(ws.REALTIME, model="gpt-realtime")
    usage = {"input_tokens": 200, "output_tokens": 90, "total_tokens": 290,
             "input_token_details": {"text_tokens": 120, "audio_tokens": 80, "cached_tokens": 64},
             "output_token_details": {"text_tokens": 30, "audio_tokens": 60}}
    # voice activity: the server starts a response nobody sent response.create for
    tracker.server_event("response.created", {"type": "response.created", "response": {"id": "r1"}}, 1.0)
    done = tracker.server_event("response.done", {"type": "response.done", "response": {
        "id": "r1", "status": "completed", "usage": usage}}, 2.0)
    assert len(done) == 1 and done[0].request.model == "gpt-realtime"
    assert (done[0].facts.usage.input_tokens, done[0].facts.usage.cached_tokens) == (200, 64)
    tracker.server_event("session.updated", {"type": "session.updated", "session": {
        "audio": {"input": {"transcription": {"model": "gpt-4o-transcribe"}}}}}, 3.0)
    [t] = tracker.server_event(ws.TRANSCRIPTION_DONE, {"type": ws.TRANSCRIPTION_DONE, "usage": {
        "type": "tokens", "input_tokens": 25, "output_tokens": 6, "total_tokens": 31}}, 4.0)
    assert t.model == "gpt-4o-transcribe" and t.usage.total_tokens == 31
    # an error names the client event it answers
    p = tracker.client_event("response.create", {"type": "response.create", "event_id": "ev1"}, 10, 5.0)
    tracker.sent(p)
    assert tracker.server_event("error", {"type": "error", "error": {"message": "x", "event_id": "other"}}, 6) == []
    assert tracker.server_event("error", {"type": "error", "error": {"message": "x", "event_id": "ev1"}}, 6) == [p]


def test_sniff_reads_spaced_heads_and_big_frames():
    spaced = json.dumps({"type": "response.create", "model": "gpt-5"}).encode()  # json.dumps' default spacing
    assert ws.sniff_type(spaced, ws.CLIENT_EVENTS) == "response.create"
    big = json.dumps({"type": "response.create", "input": "x" * (5 << 20)}).encode()
    assert ws.sniff_type(big, ws.CLIENT_EVENTS) == "response.create"
    assert ws.parse_event(big, "response.create", ws.CLIENT_EVENTS) == ("response.create", None)
