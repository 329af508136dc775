"""The pixel pipeline, against values computed by hand from the DICOM definitions."""

from __future__ import annotations

import numpy as np
import pytest

from tui import imaging
from tui.imaging import Geometry, Window


def test_modality_lut_applies_slope_then_intercept() -> None:
    stored = np.array([[0, 1000], [2, 3]], dtype=np.uint16)
    hu = imaging.modality_lut(stored, slope=2.0, intercept=-1024.0)
    assert hu.tolist() == [[-1024.0, 976.0], [-1020.0, -1018.0]]
    assert hu.dtype == np.float32


def test_voi_linear_follows_the_dicom_formula_at_its_edges() -> None:
    # c=40, w=80: the ramp runs from c-0.5-(w-1)/2 = 0 to c-0.5+(w-1)/2 = 79.
    values = np.array([-10.0, 0.0, 39.5, 40.0, 79.0, 100.0])
    grey = imaging.voi_linear(values, Window(40, 80))
    # 39.5 -> 0.5*255 = 127.5 -> 128; 40 -> (0.5/79 + 0.5)*255 = 129.11 -> 129.
    assert grey.tolist() == [0, 0, 128, 129, 255, 255]


def test_voi_invert_mirrors_the_grey_scale() -> None:
    values = np.array([0.0, 39.5, 79.0])
    assert imaging.voi_linear(values, Window(40, 80), invert=True).tolist() == [255, 127, 0]


def test_voi_width_one_is_a_threshold() -> None:
    grey = imaging.voi_linear(np.array([-0.5, 0.0]), Window(0, 1))
    assert grey.tolist() == [0, 255]


def test_window_width_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Window(0, 0.5)


def test_presets_are_the_eight_clinical_windows_in_key_order() -> None:
    names = [name for name, _ in imaging.PRESETS]
    assert names == [
        "brain", "subdural", "stroke", "bone", "lung", "abdomen", "liver", "mediastinum",
    ]  # fmt: skip
    assert dict(imaging.PRESETS)["lung"] == Window(-600, 1500)


def test_drag_right_widens_and_drag_down_raises_the_level() -> None:
    w = imaging.window_from_drag(Window(40, 80), dx=10, dy=-4, sensitivity=2.0)
    assert w == Window(32, 100)
    assert imaging.window_from_drag(Window(40, 80), dx=-100, dy=0, sensitivity=2).width == 1


def test_geometry_fits_a_512_slice_into_200x60_cells() -> None:
    g = Geometry.for_cells((512, 512), (200, 60))
    assert g.grid == (200, 120)
    assert g.scale == (120 / 512, 120 / 512)
    assert g.image_to_display((255.5, 255.5)) == (100.0, 60.0)
    assert g.image_to_cell((255.5, 255.5)) == (100, 30)


def test_cell_to_image_and_back_is_the_identity_for_every_cell() -> None:
    g = Geometry.for_cells((512, 400), (80, 24), zoom=1.7, center=(180.0, 300.0))
    for col in range(80):
        for row in range(24):
            assert g.image_to_cell(g.cell_to_image(col, row)) == (col, row)


def test_non_square_pixels_keep_their_physical_shape() -> None:
    # 100 rows of 2 mm and 200 columns of 1 mm: a 200 mm square on screen.
    g = Geometry((100, 200), (100, 100), spacing=(2.0, 1.0))
    assert g.scale == (0.5, 1.0)


def test_pan_moves_the_image_by_display_pixels_and_zoom_is_clamped() -> None:
    g = Geometry.for_cells((512, 512), (200, 60))
    moved = g.panned(10, 0)
    before = g.image_to_display((100.0, 100.0))
    after = moved.image_to_display((100.0, 100.0))
    assert after[0] == pytest.approx(before[0] - 10)
    assert after[1] == pytest.approx(before[1])
    assert g.zoomed(1000).zoom == imaging.MAX_ZOOM
    assert g.zoomed(0.0001).zoom == imaging.MIN_ZOOM


def test_nearest_resampling_doubles_each_pixel_at_scale_two() -> None:
    img = np.arange(16, dtype=np.float32).reshape(4, 4)
    values, mask = imaging.resample(img, Geometry((4, 4), (8, 8)), "nearest")
    assert np.array_equal(values, np.kron(img, np.ones((2, 2), dtype=np.float32)))
    assert mask.all()


def test_area_resampling_averages_each_block_when_shrinking() -> None:
    img = np.arange(16, dtype=np.float32).reshape(4, 4)
    values, _ = imaging.resample(img, Geometry((4, 4), (2, 2)), "area")
    expected = img.reshape(2, 2, 2, 2).mean(axis=(1, 3))
    assert values.tolist() == expected.tolist()  # [[2.5, 4.5], [10.5, 12.5]]


def test_box_resampling_is_the_area_mean_when_tiles_fit_and_near_it_when_not() -> None:
    img = np.random.default_rng(5).normal(40, 20, (64, 64)).astype(np.float32)
    aligned = Geometry((64, 64), (16, 16))  # 4 image pixels a display pixel: 4x4 tiles
    box, _ = imaging.resample(img, aligned, "box")
    area, _ = imaging.resample(img, aligned, "area")
    assert np.allclose(box, area, atol=1e-4)
    assert np.allclose(box, img.reshape(16, 4, 16, 4).mean(axis=(1, 3)), atol=1e-4)
    ragged = Geometry((64, 64), (19, 19))  # 3.4 pixels: 3x3 tiles under each centre
    box, mask = imaging.resample(img, ragged, "box")
    area, _ = imaging.resample(img, ragged, "area")
    assert mask.all()
    assert np.abs(box - area).mean() < 0.5 * np.abs(img - 40).mean()  # near, not the noise
    assert np.abs(box - 40).std() < 0.5 * np.abs(img - 40).std()  # averaged, not picked


def _resampled_by_hand(
    modality: np.ndarray, geom: Geometry, mode: str
) -> tuple[np.ndarray, np.ndarray]:
    """resample as first written: the display grid's sample points computed for each call,
    box tiles picked by a 2-D index (the reference the kept and flat-indexed version meets)."""
    rows, cols = modality.shape
    xs, ys = geom.sample_axes()
    ix, iy = np.floor(xs + 0.5).astype(np.intp), np.floor(ys + 0.5).astype(np.intp)
    mask = ((iy >= 0) & (iy < rows))[:, None] & ((ix >= 0) & (ix < cols))[None, :]
    sx, sy = geom.scale
    block = int(1 / max(sx, sy)) if sx < 1 and sy < 1 else 1
    if mode == "area" and (sx < 1 or sy < 1):
        return imaging._area_average(modality, xs, ys, sx, sy), mask
    if mode == "box" and block >= 2 and rows >= block and cols >= block:
        means = imaging.block_means(modality, block)
        by = np.clip(iy // block, 0, means.shape[0] - 1)
        bx = np.clip(ix // block, 0, means.shape[1] - 1)
        return means[by[:, None], bx[None, :]], mask
    return modality[np.clip(iy, 0, rows - 1)[:, None], np.clip(ix, 0, cols - 1)[None, :]], mask


@pytest.mark.parametrize(
    ("dtype", "slope", "intercept"),
    [
        (np.int16, 1.0, -1024.0),  # CT: the integer path
        (np.uint16, 1.0, 0.0),
        (np.uint8, 1.0, 3.0),
        (np.int16, 1.0, -1024.5),  # not an integer: the LUT first
        (np.int16, 0.5, -1024.0),  # a slope: the LUT first
        (np.int32, 1.0, -1024.0),  # too wide to promise exact sums
        (np.float32, 1.0, 0.0),
    ],
)
def test_resampling_from_stored_values_is_bit_for_bit_the_lut_then_resample(
    dtype: type, slope: float, intercept: float
) -> None:
    rng = np.random.default_rng(11)
    stored: np.ndarray
    if np.dtype(dtype).kind == "f":
        stored = rng.normal(0, 500, (97, 130)).astype(dtype)
    else:
        info = np.iinfo(dtype)
        low, high = max(int(info.min), -40_000), min(int(info.max), 70_000)
        stored = rng.integers(low, high, (97, 130), endpoint=True).astype(dtype)
    modality = imaging.modality_lut(stored, slope, intercept)
    for cells, zoom, center in [
        ((40, 12), 1.0, None),  # shrunk about 3x: box tiles
        ((23, 9), 1.0, None),  # ragged tiles
        ((200, 60), 1.0, None),  # magnified: nearest
        ((60, 20), 3.0, (10.0, 90.0)),  # zoomed into a corner, partly off the image
        ((60, 20), 0.3, None),  # zoomed out: black around the image
        ((130, 25), 1.0, None),  # shrunk along one axis only: area averages
    ]:
        geom = Geometry.for_cells(stored.shape, cells, spacing=(0.7, 1.1), zoom=zoom, center=center)
        for mode in ("nearest", "box", "area"):
            expected, expected_mask = _resampled_by_hand(modality, geom, mode)
            for values, mask in (
                imaging.resample(modality, geom, mode),
                imaging.resample_stored(stored, slope, intercept, geom, mode),
            ):
                assert values.dtype == np.float32
                assert np.array_equal(mask, expected_mask)
                # The same bits: the same float32 sums, not merely close ones.
                assert np.array_equal(values.view(np.uint32), expected.view(np.uint32)), mode
            grey = imaging.render_grey_stored(stored, slope, intercept, geom, Window(40, 400))
            assert np.array_equal(grey, imaging.render_grey(modality, geom, Window(40, 400)))


def test_tile_sums_in_integers_only_where_float32_would_sum_them_exactly() -> None:
    ct = np.zeros((8, 8), dtype=np.int16)
    assert imaging.stored_block_means(ct, 1.0, -1024.0, 4) is not None
    assert imaging.stored_block_means(ct, 2.0, -1024.0, 4) is None  # a slope
    assert imaging.stored_block_means(ct, 1.0, -0.5, 4) is None  # not an integer
    assert imaging.stored_block_means(ct, 1.0, float("nan"), 4) is None
    assert imaging.stored_block_means(ct.astype(np.int32), 1.0, 0.0, 4) is None  # too wide
    assert imaging.stored_block_means(ct.astype(np.float32), 1.0, 0.0, 4) is None
    # 23x23 tiles of int16 values could reach 2**24 together: float32 would round them.
    assert imaging.stored_block_means(ct, 1.0, 0.0, 22) is not None
    assert imaging.stored_block_means(ct, 1.0, 0.0, 23) is None


def test_outside_the_image_is_black_when_zoomed_out() -> None:
    img = np.full((10, 10), 1000.0, dtype=np.float32)
    grey = imaging.render_grey(img, Geometry((10, 10), (20, 20), zoom=0.5), Window(0, 100))
    assert grey[10, 10] == 255
    assert grey[0, 0] == 0
    assert grey[19, 19] == 0
    assert int((grey == 255).sum()) == 100  # a 10x10 display square


def test_draw_line_and_cross_mark_the_expected_pixels() -> None:
    rgb = np.zeros((5, 6, 3), dtype=np.uint8)
    imaging.draw_line(rgb, (1, 1), (4, 1), (255, 0, 0))
    assert [x for x in range(6) if rgb[1, x, 0] == 255] == [1, 2, 3, 4]
    assert rgb[0].sum() == 0
    rgb2 = np.zeros((9, 9, 3), dtype=np.uint8)
    imaging.draw_cross(rgb2, (4, 4), (0, 255, 0), arm=2)
    assert int((rgb2[:, :, 1] == 255).sum()) == 9  # 5 + 5 sharing the centre


def test_drawing_off_the_grid_is_clipped_not_an_error() -> None:
    rgb = np.zeros((4, 4, 3), dtype=np.uint8)
    imaging.draw_line(rgb, (-100, -100), (100, 100), (1, 2, 3))
    imaging.draw_ellipse(rgb, (50, 50), 3, 3, (1, 2, 3))
    assert [(y, x) for y, x in zip(*np.nonzero(rgb[:, :, 0]), strict=True)] == [
        (0, 0), (1, 1), (2, 2), (3, 3),
    ]  # fmt: skip


def test_position_uses_image_position_and_orientation() -> None:
    pos = imaging.position_mm(
        (10, 20), (0.5, 0.5), origin=(-100.0, -100.0, 50.0), orientation=(1, 0, 0, 0, 1, 0)
    )
    assert pos == (-95.0, -90.0, 50.0)
    assert imaging.position_mm((10, 20), (0.5, 0.25)) == (2.5, 10.0)


def test_a_magnified_view_is_drawn_on_a_native_grid_that_maps_to_the_same_cells() -> None:
    full = Geometry.for_cells((100, 100), (50, 20), (10, 20))  # 500x400 px: x4 magnified
    native = full.at_most_native((50, 20))
    assert min(native.scale) == pytest.approx(1.0)
    assert native.grid == (125, 100)
    for p in [(0.0, 0.0), (37.5, 80.25), (99.0, 12.0)]:
        assert native.image_to_cell(p) == full.image_to_cell(p)
    small = Geometry.for_cells((1000, 1000), (50, 20), (10, 20))  # shrunk: unchanged
    assert small.at_most_native((50, 20)) is small
