"""Pure attribution: interpolation, overlap split, idle bucket, conservation (hypothesis)."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llem_server.energy.attribution import Span, edge_step_mj, energy_at, split, updates_inside
from llem_server.energy.sampler import Reading, Sampler


def test_energy_at_interpolates_and_refuses_outside():
    t, e = [0.0, 1.0, 2.0], [0.0, 100.0, 400.0]
    assert energy_at(t, e, 0.5) == 50.0
    assert energy_at(t, e, 1.5) == 250.0
    assert energy_at(t, e, 2.0) == 400.0
    assert energy_at(t, e, -0.1) is None and energy_at(t, e, 2.1) is None
    assert edge_step_mj(t, e, 1.5) == 300.0
    # beside a point where the load changed, the edge may lie in either step: the larger
    assert edge_step_mj(t, e, 1.02) == 300.0 and edge_step_mj(t, e, 0.98) == 300.0
    assert edge_step_mj(t, e, 0.2) == 100.0
    assert updates_inside(t, 0.0, 2.0) == 1


def test_an_edge_inside_a_long_brackets_range_counts_both_steps_of_its_point():
    # Busy steps of ~60 J, then idle ones of ~10 J. The point at 1.2 s comes from a stalled
    # read: its update lies somewhere in (1.05, 1.32] (timed at the midpoint). An edge at
    # 1.27 s looks to lie in the idle step after it, yet may lie in the busy one before.
    t = [1.0, 1.2, 1.3, 1.4]
    e = [0.0, 120_000.0, 130_000.0, 140_000.0]  # mJ: 120 J (two busy updates), then 10 J each
    assert edge_step_mj(t, e, 1.27) == 10_000.0  # the estimate alone: the idle steps
    lo, hi = [1.0, 1.05, 1.3, 1.4], [1.0, 1.32, 1.3, 1.4]
    assert edge_step_mj(t, e, 1.27, lo, hi) == 120_000.0
    assert edge_step_mj(t, e, 1.35, lo, hi) == 10_000.0  # outside that range: as before


def test_split_by_time_and_by_tokens():
    t, e = [0.0, 4.0], [0.0, 400.0]  # 100 mJ/s
    spans = [Span("a", 0.0, 2.0, 10), Span("b", 1.0, 3.0, 30)]
    s = split(t, e, spans, 0.0, 4.0, by="time")
    assert s.shares_mj == pytest.approx({"a": 150.0, "b": 150.0}) and s.idle_mj == pytest.approx(100.0)
    s = split(t, e, spans, 0.0, 4.0, by="tokens")  # rates 5/s and 15/s in the shared second
    assert s.shares_mj == pytest.approx({"a": 125.0, "b": 175.0}) and s.by_tokens
    # An open window (no tokens yet) forces time split for the pieces it shares.
    s = split(t, e, [Span("a", 0.0, 2.0, 10), Span("b", 1.0, None)], 0.0, 4.0, by="tokens")
    assert s.shares_mj == pytest.approx({"a": 150.0, "b": 250.0}) and s.idle_mj == 0 and s.by_time


def test_a_vanishingly_short_span_splits_no_nan():
    # Found by hypothesis in CI: a span 1e-323 s long has an infinite token rate.
    t = [i * 0.1 for i in range(11)]
    e = [i * 10.0 for i in range(11)]
    s = split(t, e, [Span("a", 0.0, 1e-323, 1), Span("b", 0.0, 5e-324, 1), Span("c", 0.0, 1.0, 5)], 0.0, 1.0,
              by="tokens")
    assert all(math.isfinite(v) for v in s.shares_mj.values())
    assert sum(s.shares_mj.values()) + s.idle_mj == pytest.approx(100.0)


points = st.lists(st.floats(0.0, 700.0), min_size=3, max_size=40)  # power per 0.1 s step, W


@st.composite
def curve_and_spans(draw):
    watts = draw(points)
    t = [i * 0.1 for i in range(len(watts) + 1)]
    e = [0.0]
    for w in watts:
        e.append(e[-1] + w * 100)  # mJ per 0.1 s
    end = t[-1]
    spans = []
    for k in range(draw(st.integers(0, 12))):
        a = draw(st.floats(0.0, end))
        b = draw(st.one_of(st.none(), st.floats(a, end)))
        spans.append(Span(k, a, b, draw(st.one_of(st.none(), st.integers(1, 500)))))
    return t, e, spans


@settings(max_examples=300, deadline=None)
@given(curve_and_spans(), st.sampled_from(["time", "tokens"]))
def test_attributed_plus_idle_is_the_curve_delta(data, by):
    t, e, spans = data
    s = split(t, e, spans, t[0], t[-1], by=by)
    assert sum(s.shares_mj.values()) + s.idle_mj == pytest.approx(e[-1] - e[0], rel=1e-9, abs=1e-6)
    assert all(v >= -1e-9 for v in s.shares_mj.values()) and s.idle_mj >= -1e-9


@settings(max_examples=100, deadline=None)
@given(curve_and_spans())
def test_exclusive_span_gets_the_curve_over_it(data):
    t, e, spans = data
    if not spans or spans[0].end is None:
        return
    only = spans[0]
    s = split(t, e, [only], t[0], t[-1])
    assert s.shares_mj.get(only.key, 0.0) == pytest.approx(
        energy_at(t, e, only.end) - energy_at(t, e, only.start), abs=1e-6)


def _sampler(mode="counter"):
    clock = [0.0]
    box = {}
    s = Sampler(lambda: Reading(box["v"]), mode=mode, clock=lambda: clock[0])
    return s, clock, box


def test_sampler_change_points_at_midpoints_and_backwards_gap():
    s, clock, box = _sampler()
    for tt, v in [(0.0, 1000), (0.1, 1000), (0.2, 1500), (0.3, 2000), (0.4, 50), (0.5, 550)]:
        clock[0], box["v"] = tt, v
        s.sample_once()
    v = s.view(0.0, 1.0)
    assert v.pt_t == pytest.approx([0.0, 0.15, 0.25, 0.4, 0.45])
    assert v.pt_e == pytest.approx([1000, 1500, 2000, 2000, 2500])  # continuous over the reset
    assert v.resolution_mj == 500
    assert len(v.gaps) == 1 and v.gaps[0][0] == pytest.approx(0.25) and "went backwards" in v.gaps[0][2]
    assert s.view(0.45, 0.5).gaps == []


def test_sampler_power_mode_integrates_and_ring_buffer_trims():
    clock = [0.0]
    s = Sampler(lambda: Reading(200.0), mode="power", clock=lambda: clock[0], capacity=10)
    for k in range(50):
        clock[0] = k * 0.1
        s.sample_once()
    v = s.view(0.0, 10.0)
    assert len(v.pt_t) <= 20 and v.oldest_t > 0
    assert (v.pt_e[-1] - v.pt_e[0]) / 1000 == pytest.approx(200 * (v.pt_t[-1] - v.pt_t[0]))
    assert s.first_point() == (0.0, 0.0)  # kept for counter_delta after trimming
