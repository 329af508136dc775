"""Hit-testing annotations in image coordinates."""

from __future__ import annotations

import math

import pytest

from tui.hittest import distance, distance_to_ellipse, distance_to_segment, pick


def test_segment_distance_is_perpendicular_inside_and_to_the_end_outside() -> None:
    assert distance_to_segment((5, 3), (0, 0), (10, 0)) == pytest.approx(3)
    assert distance_to_segment((13, 4), (0, 0), (10, 0)) == pytest.approx(5)
    assert distance_to_segment((1, 1), (0, 0), (0, 0)) == pytest.approx(math.sqrt(2))


def test_ellipse_distance_is_exact_on_the_axes() -> None:
    assert distance_to_ellipse((14, 0), (0, 0), 10, 5) == pytest.approx(4)
    assert distance_to_ellipse((0, 2), (0, 0), 10, 5) == pytest.approx(3)


def test_a_click_inside_an_ellipse_hits_it_but_a_closer_point_wins() -> None:
    roi = ("ellipse", [(50.0, 50.0), (20.0, 10.0)])
    dot = ("point", [(52.0, 50.0)])
    assert pick([roi], (50, 50), 3) == 0
    assert pick([roi, dot], (51, 50), 3) == 1
    assert pick([roi], (50, 65), 3) is None


def test_angle_hits_either_leg_from_the_vertex() -> None:
    angle = [(0.0, 0.0), (10.0, 0.0), (0.0, 10.0)]
    assert distance("angle", angle, (0.5, 6), 2) == pytest.approx(0.5)
    assert distance("angle", angle, (6, 0.5), 2) == pytest.approx(0.5)
    # The chord between the two leg ends is not drawn, so it does not hit.
    assert distance("angle", angle, (5, 5), 2) > 2


def test_pick_takes_the_nearest_within_tolerance_and_the_newest_on_a_tie() -> None:
    shapes = [
        ("length", [(0.0, 0.0), (10.0, 0.0)]),
        ("point", [(5.0, 4.0)]),
        ("arrow", [(0.0, 0.0), (10.0, 0.0)]),
    ]
    assert pick(shapes, (5, 3.5), 2) == 1
    assert pick(shapes, (5, 1), 2) == 2  # length and arrow coincide: the newer one
    assert pick(shapes, (30, 30), 2) is None
    assert pick([("point", [])], (0, 0), 5) is None
