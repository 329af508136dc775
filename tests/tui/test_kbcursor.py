"""Pure maths of the reading room: the keyboard cursor and a series' first window."""

from __future__ import annotations

import numpy as np

from tui import imaging, kbcursor
from tui.imaging import Window


def test_the_cursor_starts_at_the_pointer_or_the_centre_and_stays_on_the_image() -> None:
    assert kbcursor.start((100, 200)) == (99.0, 49.0)
    assert kbcursor.start((100, 200), (12.4, 30.6)) == (12.0, 31.0)
    assert kbcursor.start((100, 200), (float("nan"), 3.0)) == (99.0, 49.0)
    assert kbcursor.start((100, 200), (-5.0, 500.0)) == (0.0, 99.0)


def test_steps_are_one_cell_and_shift_is_eight() -> None:
    step = kbcursor.step_pixels(1.0, 0.5)  # zoomed out: a cell covers two image pixels
    assert step == 2.0
    assert kbcursor.step_pixels(1.0, 4.0) == 1.0  # zoomed in: never less than a pixel
    assert kbcursor.step_pixels(0.0, 1.0) == 1.0
    assert kbcursor.moved((10.0, 10.0), 1, 0, (64, 64), step) == (12.0, 10.0)
    assert kbcursor.moved((10.0, 10.0), 0, -1, (64, 64), step, big=True) == (10.0, 0.0)
    assert kbcursor.moved((60.0, 10.0), 1, 1, (64, 64), step, big=True) == (63.0, 26.0)


def test_the_first_window_of_a_series() -> None:
    ct = np.full((8, 8), 40.0, dtype=np.float32)
    own = Window(300, 1500)
    assert imaging.default_window(own, "CT", "Head", ct) == own  # the file's own first
    assert imaging.default_window(None, "CT", "HEAD routine", ct) == Window(40, 80)
    assert imaging.default_window(None, "CT", "Brain w/o", ct) == Window(40, 80)
    assert imaging.default_window(None, "CT", "Chest axial", ct) == Window(40, 400)
    mr = np.linspace(0, 1000, 10001, dtype=np.float32)
    w = imaging.default_window(None, "MR", "Ax T2", mr)
    assert abs(w.center - 500) < 1
    assert abs(w.width - 980) < 1
    assert imaging.default_window(Window(float("nan"), 10), "MR", "", mr) == w
    flat = imaging.default_window(None, "MR", "", np.zeros((4, 4), np.float32))
    assert flat.width >= 1
    assert imaging.default_window(None, "OT", "", np.array([np.nan], np.float32)).width >= 1
