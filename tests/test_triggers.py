"""Trigger parsing, interval triggers and scene-change detection (pure, fake clock)."""

from __future__ import annotations

import json
import threading
import time

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.triggers import (
    IntervalTrigger,
    SceneChangeDetector,
    SceneSettings,
    SceneState,
    TriggerError,
    changed_fraction,
    parse_trigger,
    run_interval,
    small_grey,
)
from edge_agent.types import Trigger


class FakeClock:
    def __init__(self, wall: float = 1_700_000_000.0, mono: float = 100.0) -> None:
        self.wall, self.mono = wall, mono

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


CLOCK = FakeClock()


# -- parse_trigger -----------------------------------------------------------


@pytest.mark.parametrize(
    "payload, item_id",
    [
        (b'{"item_id": "A1234"}', "A1234"),
        (b'{"item_id": 42}', "42"),
        (b'{"item_id": 0}', "0"),
        (b'{"item_id": "  X-9  ", "belt": 3, "meta": {"a": [1, 2]}}', "X-9"),
        ('{"item_id": "Brief-\u00e9\u00df"}'.encode(), "Brief-\u00e9\u00df"),
        (b'\xef\xbb\xbf{"item_id": "bom"}', "bom"),
    ],
)
def test_valid_triggers(payload, item_id):
    trigger = parse_trigger(payload, CLOCK)
    assert trigger == Trigger(item_id=item_id, received_at=CLOCK.wall)


def test_mqtt5_properties_pass_through():
    trigger = parse_trigger(b'{"item_id": "A"}', CLOCK, response_topic="plc/answers", correlation_data=b"\x01")
    assert trigger.response_topic == "plc/answers" and trigger.correlation_data == b"\x01"


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"", "empty"),
        (b"item 42", "not JSON"),
        (b'{"item_id": "A"', "not JSON"),
        (b"[1, 2]", "JSON object"),
        (b'"A1234"', "JSON object"),
        (b"42", "JSON object"),
        (b"null", "JSON object"),
        (b'{"id": "A1234"}', "no item_id"),
        (b'{"item_id": ""}', "empty"),
        (b'{"item_id": "   "}', "empty"),
        (b'{"item_id": null}', "string or an integer"),
        (b'{"item_id": true}', "string or an integer"),
        (b'{"item_id": 4.5}', "string or an integer"),
        (b'{"item_id": ["A"]}', "string or an integer"),
        (b'{"item_id": {"id": 1}}', "string or an integer"),
        (b'{"item_id": -3}', "negative"),
        (b'{"item_id": "A\\nB"}', "control"),
        (b'{"item_id": "A\\u0000"}', "control"),
        (b'{"item_id": "\\ud800"}', "unprintable"),
        (b'{"item_id": "' + b"A" * 65 + b'"}', "65 characters"),
        (b'{"item_id": ' + b"9" * 200 + b"}", "too long"),
        (b'{"item_id": "caf\xe9"}', "not UTF-8"),
        (b"\xff\xfe{}", "not UTF-8"),
    ],
)
def test_invalid_triggers(payload, message):
    with pytest.raises(TriggerError, match=message):
        parse_trigger(payload, CLOCK)


def test_oversized_payload_is_rejected_before_parsing():
    # Ten megabytes of bytes that are not even UTF-8: the size check must come
    # first, so the error is about size and nothing was decoded.
    with pytest.raises(TriggerError, match="10485760 bytes; the limit is 4096"):
        parse_trigger(b"\xff" * (10 * 1024 * 1024), CLOCK)
    big_but_valid = json.dumps({"item_id": "A", "pad": "x" * (10 * 1024 * 1024)}).encode()
    with pytest.raises(TriggerError, match="limit is 4096"):
        parse_trigger(big_but_valid, CLOCK)


def test_size_limit_is_inclusive_and_configurable():
    payload = b'{"item_id": "A", "pad": "' + b"x" * 100 + b'"}'
    assert parse_trigger(payload, CLOCK, max_bytes=len(payload)).item_id == "A"
    with pytest.raises(TriggerError):
        parse_trigger(payload, CLOCK, max_bytes=len(payload) - 1)


def test_deep_nesting_is_a_trigger_error():
    with pytest.raises(TriggerError):
        parse_trigger(b"[" * 50_000, CLOCK, max_bytes=100_000)


def test_non_bytes_payload_is_a_trigger_error():
    with pytest.raises(TriggerError, match="bytes"):
        parse_trigger('{"item_id": "A"}', CLOCK)  # type: ignore[arg-type]
    assert parse_trigger(bytearray(b'{"item_id": 1}'), CLOCK).item_id == "1"


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=80),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def assert_only_trigger_error(payload: bytes) -> None:
    try:
        trigger = parse_trigger(payload, CLOCK)
    except TriggerError:
        return
    assert isinstance(trigger, Trigger)
    assert 0 < len(trigger.item_id) <= 64 and trigger.item_id.isprintable()
    trigger.item_id.encode("utf-8")  # storable and publishable


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=5000))
def test_any_bytes_give_a_trigger_or_trigger_error(payload):
    assert_only_trigger_error(payload)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.sampled_from(["item_id", "id", "x"]) | st.text(max_size=6), JSON_VALUES, max_size=5))
def test_any_json_object_gives_a_trigger_or_trigger_error(obj):
    assert_only_trigger_error(json.dumps(obj).encode())


@settings(max_examples=200, deadline=None)
@given(JSON_VALUES, st.booleans())
def test_any_json_value_gives_a_trigger_or_trigger_error(value, ascii_only):
    assert_only_trigger_error(json.dumps({"item_id": value}, ensure_ascii=ascii_only).encode())


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(categories=["L", "N", "P"]), min_size=1, max_size=64))
def test_printable_ids_round_trip(item_id):
    assert parse_trigger(json.dumps({"item_id": item_id}).encode(), CLOCK).item_id == item_id


# -- IntervalTrigger ---------------------------------------------------------


def test_interval_trigger_fires_on_schedule():
    clock = FakeClock()
    interval = IntervalTrigger(0.5)
    first = interval.poll(clock)
    assert first is not None and first.item_id == f"auto-{int(clock.wall * 1000)}-1"
    assert first.received_at == clock.wall
    assert interval.poll(clock) is None
    clock.advance(0.3)
    assert not interval.due(clock.mono) and interval.seconds_until_due(clock.mono) == pytest.approx(0.2)
    clock.advance(0.2)
    second = interval.poll(clock)
    assert second is not None and second.item_id.endswith("-2")
    assert second.item_id != first.item_id


def test_interval_trigger_keeps_cadence_but_does_not_burst_after_a_stall():
    clock = FakeClock()
    interval = IntervalTrigger(1.0, prefix="demo")
    interval.poll(clock)
    clock.advance(1.2)  # a little late: the next one stays on the 1 s grid
    assert interval.poll(clock) is not None
    clock.advance(0.8)
    assert interval.due(clock.mono)
    interval.poll(clock)
    clock.advance(60)  # agent was stuck: one trigger, not sixty
    fired = [interval.poll(clock) for _ in range(5)]
    assert sum(t is not None for t in fired) == 1
    assert fired[0].item_id.startswith("demo-")
    clock.advance(1.0)
    assert interval.due(clock.mono)


def test_interval_trigger_start_at_and_bad_period():
    interval = IntervalTrigger(1.0, start_at=10.0)
    assert not interval.due(9.9) and interval.due(10.0)
    with pytest.raises(ValueError):
        IntervalTrigger(0)


def test_run_interval_emits_until_stopped():
    class Clock:
        def time(self) -> float:
            return time.time()

        def monotonic(self) -> float:
            return time.monotonic()

    stop = threading.Event()
    got: list[Trigger] = []

    def emit(trigger: Trigger) -> None:
        got.append(trigger)
        if len(got) == 3:
            stop.set()

    worker = threading.Thread(target=run_interval, args=(IntervalTrigger(0.01), Clock(), emit, stop))
    worker.start()
    worker.join(10)
    assert not worker.is_alive()
    assert [t.item_id.rsplit("-", 1)[1] for t in got] == ["1", "2", "3"]


# -- scene change ------------------------------------------------------------

H, W = 480, 640
_rng = np.random.default_rng(7)
# A conveyor belt: dark grey with some fixed texture.
BELT = cv2.GaussianBlur(_rng.normal(90, 25, (H, W)).clip(0, 255).astype(np.uint8), (7, 7), 0)
BELT = cv2.cvtColor(BELT, cv2.COLOR_GRAY2BGR)


def envelope(postcode: str) -> np.ndarray:
    card = np.full((300, 500, 3), 235, np.uint8)
    cv2.putText(card, postcode, (40, 190), cv2.FONT_HERSHEY_SCRIPT_SIMPLEX, 3.2, (30, 30, 30), 6)
    return card


def view(
    card: np.ndarray | None = None, x: int = 70, y: int = 90, brightness: int = 0, noise_seed: int = 0
) -> np.ndarray:
    """The camera image: the belt, an envelope with its left edge at x, sensor noise."""
    image = BELT.astype(np.int16)
    if card is not None:
        x0, x1 = max(x, 0), min(x + card.shape[1], W)
        if x1 > x0:
            image[y : y + card.shape[0], x0:x1] = card[:, x0 - x : x1 - x]
    noise = np.random.default_rng(noise_seed).normal(0, 2.5, image.shape)
    return (image + noise + brightness).clip(0, 255).astype(np.uint8)


class Feed:
    """Feeds frames to a detector at 10 fps of fake time and counts triggers."""

    def __init__(self, detector: SceneChangeDetector) -> None:
        self.detector = detector
        self.now = 0.0
        self.frames = 0
        self.fired_at: list[int] = []

    def show(self, image: np.ndarray, times: int = 1) -> None:
        for _ in range(times):
            self.frames += 1
            self.now += 0.1
            if self.detector.update(image if times == 1 else view_jitter(image, self.frames), self.now):
                self.fired_at.append(self.frames)

    def arrive(self, card: np.ndarray, leaving: np.ndarray | None = None) -> None:
        """Slide `card` in from the left (pushing `leaving` out to the right)."""
        for step, x in enumerate(range(-500, 71, 95)):
            if leaving is not None and x < 70 - 300:
                self.show(view(leaving, 70 + (x + 500), noise_seed=self.frames))
            else:
                self.show(view(card, x, noise_seed=self.frames))

    def leave(self, card: np.ndarray) -> None:
        for x in range(165, W + 1, 95):
            self.show(view(card, x, noise_seed=self.frames))

    @property
    def count(self) -> int:
        return len(self.fired_at)


def view_jitter(image: np.ndarray, seed: int) -> np.ndarray:
    """The same scene again with fresh sensor noise."""
    noise = np.random.default_rng(seed).normal(0, 2.5, image.shape)
    return (image.astype(np.float32) + noise).clip(0, 255).astype(np.uint8)


A, B = envelope("75001"), envelope("13008")


def test_still_motion_still_new_envelope_gives_one_read_each():
    feed = Feed(SceneChangeDetector())
    feed.show(view(), times=10)  # empty belt, still
    assert feed.count == 0
    feed.arrive(A)
    feed.show(view(A), times=10)  # A settles
    assert feed.count == 1
    feed.show(view(A), times=50)  # A sits there
    assert feed.count == 1
    feed.arrive(B, leaving=A)  # A pushed out, B in
    feed.show(view(B), times=10)
    assert feed.count == 2
    assert feed.detector.state is SceneState.STILL and feed.detector.triggers == 2


def test_trigger_comes_after_the_scene_settles_not_during_motion():
    feed = Feed(SceneChangeDetector(SceneSettings(settle_frames=3)))
    feed.show(view(), times=5)
    feed.arrive(A)
    arrived_at = feed.frames
    feed.show(view(A), times=10)
    assert feed.fired_at == [arrived_at + 2]  # the arrival frame plus two more still frames


def test_passing_hand_does_not_cause_a_second_read():
    feed = Feed(SceneChangeDetector())
    feed.show(view(), times=5)
    feed.arrive(A)
    feed.show(view(A), times=10)
    hand = view(A)
    hand[100:400, 200:330] = (60, 80, 120)
    feed.show(hand)
    feed.show(hand)
    feed.show(view(A), times=10)
    assert feed.count == 1


def test_exposure_change_is_not_a_new_envelope():
    feed = Feed(SceneChangeDetector())
    feed.show(view(), times=5)
    feed.arrive(A)
    feed.show(view(A), times=10)
    feed.show(view(A, brightness=18), times=10)
    assert feed.count == 1


def test_empty_belt_between_look_alikes_with_background_configured():
    feed = Feed(SceneChangeDetector(background=view()))
    feed.show(view(), times=5)
    feed.arrive(A)
    feed.show(view(A), times=10)
    feed.leave(A)
    feed.show(view(), times=10)  # empty belt settles: nothing to read
    assert feed.count == 1
    feed.arrive(envelope("75001"))  # a second letter to the same postcode
    feed.show(view(A), times=10)
    assert feed.count == 2


def test_without_background_the_empty_belt_is_read_too():
    # Documented limitation: without a background image an empty belt after an
    # envelope looks like a new scene (the reader then reports no postcode).
    feed = Feed(SceneChangeDetector())
    feed.show(view(), times=5)
    feed.arrive(A)
    feed.show(view(A), times=10)
    feed.leave(A)
    feed.show(view(), times=10)
    assert feed.count == 2


def test_startup_with_a_still_envelope_does_not_trigger():
    feed = Feed(SceneChangeDetector())
    feed.show(view(A), times=30)
    assert feed.count == 0


def test_startup_with_an_envelope_moving_in_triggers_once():
    feed = Feed(SceneChangeDetector(background=view()))
    feed.arrive(A)
    feed.show(view(A), times=30)
    assert feed.count == 1


def test_envelope_settling_on_the_background_never_triggers():
    background = view()
    feed = Feed(SceneChangeDetector(background=background))
    feed.show(view(A), times=5)
    feed.leave(A)
    feed.show(background, times=10)
    assert feed.count == 0


def test_min_still_s_waits_for_time_as_well_as_frames():
    detector = SceneChangeDetector(SceneSettings(settle_frames=2, min_still_s=0.5), background=view())
    now = 0.0
    for x in range(-500, 71, 95):
        now += 0.1
        assert not detector.update(view(A, x, noise_seed=x + 1000), now)
    fired = []
    for i in range(10):
        now += 0.1
        fired.append(detector.update(view(A, noise_seed=100 + i), now))
    assert fired.index(True) == 4 and sum(fired) == 1  # 0.5 s after the envelope stopped


def test_greyscale_and_odd_sizes_are_accepted():
    detector = SceneChangeDetector()
    grey = cv2.cvtColor(view(A), cv2.COLOR_BGR2GRAY)
    assert detector.update(grey, 0.0) is False
    assert detector.update(cv2.resize(grey, (333, 111)), 0.1) is False
    with pytest.raises(ValueError):
        detector.update(np.zeros((0, 0), np.uint8), 0.2)


def test_changed_fraction_ignores_a_uniform_brightness_shift():
    a = small_grey(view(A))
    assert changed_fraction(a, a + 30, 20) == 0.0
    assert changed_fraction(a, small_grey(view(A, noise_seed=9)), 20) == 0.0  # sensor noise
    assert changed_fraction(a, small_grey(view(B)), 20) > SceneSettings().change_fraction


def test_one_different_digit_is_a_new_envelope():
    # Worst case: the machine stops every envelope at exactly the same place.
    feed = Feed(SceneChangeDetector(background=view()))
    for i, code in enumerate(["75001", "75002", "75002", "75012"]):
        card = envelope(code)
        feed.arrive(card, leaving=envelope(["75001", "75002", "75002"][i - 1]) if i else None)
        feed.show(view(card), times=8)
    assert feed.count == 4  # the two 75002 letters are separate items: there was motion between


def test_swap_between_two_frames_is_still_caught():
    # At a low frame rate one envelope can replace another between frames.
    feed = Feed(SceneChangeDetector(background=view()))
    feed.arrive(A)
    feed.show(view(A), times=5)
    feed.show(view(envelope("75002")), times=5)
    assert feed.count == 2


def test_settings_that_would_hide_a_swap_are_rejected():
    with pytest.raises(ValueError, match="motion_fraction"):
        SceneSettings(motion_fraction=0.05, change_fraction=0.01)
    with pytest.raises(ValueError):
        SceneSettings(settle_frames=0)


# -- the PLC's own time stamp and MQTT v5 response topics --------------------------------

from edge_agent.triggers import response_topic_refusal  # noqa: E402
from edge_agent.types import Reason  # noqa: E402


class _At:
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


def test_triggered_at_sets_the_items_time():
    trigger = parse_trigger(b'{"item_id": "A", "triggered_at": 1800000000.25}', _At(1800000000.5))
    assert trigger.triggered_at == 1800000000.25 and trigger.at == 1800000000.25
    assert trigger.received_at == 1800000000.5 and trigger.stale is None


def test_a_stamp_from_the_future_is_clamped_to_arrival():
    trigger = parse_trigger(b'{"item_id": "A", "triggered_at": 1800000009.0}', _At(1800000000.5))
    assert trigger.at == 1800000000.5


@pytest.mark.parametrize("stamp", ['"soon"', "true", "1800000000000", "12", "null", "1e400"])
def test_an_unreadable_stamp_still_answers_the_item_but_as_review(stamp):
    trigger = parse_trigger(f'{{"item_id": "A", "triggered_at": {stamp}}}'.encode(), _At(1800000000.0))
    assert trigger.item_id == "A" and trigger.stale is Reason.BAD_TRIGGER and trigger.triggered_at is None


@pytest.mark.parametrize("topic, allowed, refused", [
    ("plc/replies/3", "plc/", None),
    ("plc/replies/3", "", "not enabled"),
    ("elsewhere/x", "plc/", "outside the allowed prefix"),
    ("plc-evil/x", "plc", "outside the allowed prefix"),
    ("plc/x", "plc", None),
    ("plc/+/x", "plc/", "not a valid topic"),
    ("postcode/site-1/line-1/status", "postcode/", "agent's own topics"),
    ("postcode/site-1/line-1", "postcode/", "agent's own topics"),
    ("postcode/site-1/line-2/result", "postcode/", "another line's topic"),
    ("postcode/site-2/line-1/trigger", "postcode/", "another line's topic"),
    ("postcode/site-1/replies/x", "postcode/", None),
])
def test_response_topics_are_allowed_only_under_the_prefix_and_never_on_product_topics(topic, allowed, refused):
    why = response_topic_refusal(topic, allowed, "postcode/site-1/line-1", "postcode")
    assert (why is None) if refused is None else (refused in why)


def test_the_arrival_time_can_be_given_and_clamps_the_stamp():
    trigger = parse_trigger(b'{"item_id": "A", "triggered_at": 1800000009.0}', _At(1800000100.0),
                            received_at=1800000000.5)
    assert trigger.received_at == 1800000000.5 and trigger.at == 1800000000.5
