"""The synthetic lumbar spine phantom: determinism, anatomy, contrasts, geometry."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import ndimage

from napari_spinesegdiff.phantom import (
    BODY_NAMES,
    DISC_NAMES,
    Phantom,
    make_phantom,
    make_phantom_dataset,
)

SMALL_FOV = (21.0, 60.0, 60.0)


@pytest.fixture(scope="module")
def t2() -> Phantom:
    return make_phantom(0, contrast="T2w")


@pytest.fixture(scope="module")
def t1() -> Phantom:
    return make_phantom(0, contrast="T1w")


def _mid(vol) -> np.ndarray:
    can = vol.canonical()
    return can[can.shape[0] // 2]


def _component_at(mask: np.ndarray, row: float, col: float) -> np.ndarray:
    comps, _ = ndimage.label(mask)
    lab = comps[int(round(row)), int(round(col))]
    assert lab > 0, f"no component at ({row:.0f}, {col:.0f})"
    return comps == lab


def test_same_seed_same_arrays_other_seed_differs():
    a = make_phantom(5, fov_mm=SMALL_FOV)
    b = make_phantom(5, fov_mm=SMALL_FOV)
    c = make_phantom(6, fov_mm=SMALL_FOV)
    np.testing.assert_array_equal(a.image.data, b.image.data)
    np.testing.assert_array_equal(a.labels.data, b.labels.data)
    assert a.levels == b.levels
    assert not np.array_equal(a.image.data, c.image.data)
    assert a.levels != c.levels


def test_default_shape_types_labels_and_levels(t2: Phantom):
    img, lab = t2.image, t2.labels
    assert img.shape == lab.shape == (13, 367, 300)
    assert img.data.dtype == np.float32 and lab.data.dtype == np.uint8
    assert img.kind == "image" and lab.kind == "labels"
    assert set(np.unique(lab.data)) == {0, 1, 2, 3}
    names = [lev.name for lev in t2.levels]
    expected = [n for pair in zip(BODY_NAMES, DISC_NAMES + ("",)) for n in pair if n]
    assert names == expected
    rows = [lev.row for lev in t2.levels]
    assert np.all(np.diff(rows) > 0), "levels must run superior -> inferior"
    assert 0 <= rows[0] and rows[-1] < img.shape[1]
    assert not any(lev.degenerated for lev in t2.levels)


def test_generation_is_fast():
    start = time.perf_counter()
    make_phantom(11)
    assert time.perf_counter() - start < 3.0


def test_spacing_and_affine_as_requested():
    spacing = (4.0, 0.8, 0.7)
    p = make_phantom(2, spacing=spacing, fov_mm=(40.0, 200.0, 168.0))
    assert p.image.shape == (10, 250, 240)
    np.testing.assert_allclose(p.image.spacing, spacing)
    np.testing.assert_allclose(p.image.orientation.canonical_spacing, spacing)
    np.testing.assert_array_equal(p.image.affine, p.labels.affine)
    assert p.image.orientation.file_axcodes == ("R", "I", "P")
    # the volume is centred on the world origin
    centre = p.image.affine @ np.array([*(np.array(p.image.shape) - 1) / 2, 1.0])
    np.testing.assert_allclose(centre[:3], 0.0, atol=1e-9)


def test_canal_is_posterior_to_the_bodies(t2: Phantom):
    lab = _mid(t2.labels)
    for lev in t2.levels:
        if lev.kind != "body" or lev.name == "S1":
            continue
        body = _component_at(lab == 2, lev.row, lev.column)
        rows = np.arange(int(lev.row) - 5, int(lev.row) + 6)
        cols = np.arange(lab.shape[1])
        for r in rows:
            canal_cols = cols[lab[r] == 1]
            body_cols = cols[body[r]]
            assert canal_cols.size and body_cols.size, f"{lev.name} row {r}"
            assert canal_cols.mean() > body_cols.mean() + 20, lev.name
            assert canal_cols.min() > body_cols.max(), lev.name


def test_posterior_elements_are_separate_from_the_bodies(t2: Phantom):
    post = t2.posterior_elements.canonical().astype(bool)
    lab = t2.labels.canonical()
    assert post.any() and not (lab[post] == 2).any()
    whole = make_phantom(seed=t2.seed, label_posterior_elements=True).labels.canonical()
    assert np.array_equal(whole == 2, (lab == 2) | (post & (whole == 2)))
    assert (whole[post] == 2).mean() > 0.9  # where not overpainted by canal, discs or bodies


def test_one_disc_between_each_pair_of_bodies(t2: Phantom):
    lab = _mid(t2.labels)
    comps, n = ndimage.label(lab == 3)
    centres = ndimage.center_of_mass(lab == 3, comps, range(1, n + 1))
    bodies = [lev for lev in t2.levels if lev.kind == "body"]
    assert n == len(bodies) - 1
    for up, lo in zip(bodies[:-1], bodies[1:]):
        between = [c for c in centres if up.row < c[0] < lo.row]
        assert len(between) == 1, f"{up.name}-{lo.name}: {len(between)} disc components"
    for lev in t2.levels:
        if lev.kind == "disc":
            assert lab[int(round(lev.row)), int(round(lev.column))] == 3, lev.name


def test_t2w_contrast(t2: Phantom):
    img, lab = t2.image.canonical(), t2.labels.canonical()
    disc, vert, csf = (img[lab == k].mean() for k in (3, 2, 1))
    # the nucleus is what is bright on T2w (the annulus is dark): compare the bright end of each class
    assert np.percentile(img[lab == 3], 90) > np.percentile(img[lab == 2], 90) * 1.15
    assert csf > vert * 1.5
    assert csf > disc


def test_t1w_contrast(t1: Phantom):
    img, lab = t1.image.canonical(), t1.labels.canonical()
    marrow = img[ndimage.binary_erosion(lab == 2, np.ones((1, 5, 5)))].mean()
    disc, vert, csf = (img[lab == k].mean() for k in (3, 2, 1))
    assert disc < vert
    assert csf < marrow * 0.5
    assert csf < disc


def test_same_seed_same_geometry_across_contrasts(t2: Phantom, t1: Phantom):
    np.testing.assert_array_equal(t2.labels.data, t1.labels.data)


@pytest.mark.parametrize("seed", [0, 7])
def test_degenerated_discs_are_lower_and_darker(seed: int):
    p = make_phantom(seed, degenerated=["L4/L5"])
    lab, img = _mid(p.labels), _mid(p.image)
    assert [lev.name for lev in p.levels if lev.degenerated] == ["L4/L5"]

    def height_and_signal(name: str) -> tuple[int, float]:
        lev = p.level(name)
        disc = _component_at(lab == 3, lev.row, lev.column)
        return int(disc[:, int(round(lev.column))].sum()), float(img[disc].mean())

    h_deg, s_deg = height_and_signal("L4/L5")
    for healthy in ("L3/L4", "L2/L3"):
        h, s = height_and_signal(healthy)
        assert h_deg < 0.8 * h, (h_deg, h)
        assert s_deg < 0.6 * s, (s_deg, s)


def test_degenerated_count_picks_that_many_discs():
    p = make_phantom(3, degenerated=2, fov_mm=SMALL_FOV)
    assert sum(lev.degenerated for lev in p.levels) == 2
    assert all(lev.kind == "disc" for lev in p.levels if lev.degenerated)


def test_random_orientation_keeps_the_canonical_data():
    changed = 0
    for seed in range(4):
        plain = make_phantom(seed, fov_mm=SMALL_FOV)
        turned = make_phantom(seed, fov_mm=SMALL_FOV, random_orientation=True)
        for a, b in ((plain.image, turned.image), (plain.labels, turned.labels)):
            np.testing.assert_array_equal(a.canonical(), b.canonical())
            np.testing.assert_allclose(a.orientation.canonical_affine, b.orientation.canonical_affine)
        np.testing.assert_array_equal(turned.image.affine, turned.labels.affine)
        # the same voxel (file order) maps to the same world point
        idx = np.array([1, 2, 3])
        can_idx = np.linalg.solve(plain.image.affine, turned.image.affine @ np.array([*idx, 1.0]))[:3]
        can_idx = np.round(can_idx).astype(int)
        assert turned.image.data[tuple(idx)] == plain.image.data[tuple(can_idx)]
        changed += turned.image.orientation.file_axcodes != ("R", "I", "P")
    assert changed >= 2


def test_noise_is_rician_in_air():
    quiet = make_phantom(4, noise=0.0, bias=0.0)
    noisy = make_phantom(4, noise=0.05, bias=0.0)
    air = (quiet.image.data == 0) & (quiet.labels.data == 0)
    assert air.sum() > 10_000, "expected air behind the back"
    mean = noisy.image.data[air].mean()
    assert mean == pytest.approx(0.05 * np.sqrt(np.pi / 2), rel=0.1)


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        make_phantom(0, contrast="PD")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        make_phantom(0, degenerated=9)
    with pytest.raises(ValueError):
        make_phantom(0, degenerated=["L5/L6"])


def test_dataset_varies_and_is_deterministic():
    a = list(make_phantom_dataset(3, seed=1, fov_mm=SMALL_FOV))
    b = list(make_phantom_dataset(3, seed=1, fov_mm=SMALL_FOV))
    assert [p.contrast for p in a] == ["T2w", "T1w", "T2w"]
    assert len({p.seed for p in a}) == 3
    for p, q in zip(a, b):
        np.testing.assert_array_equal(p.image.data, q.image.data)
    assert not np.array_equal(a[0].labels.data, a[2].labels.data)


def test_truth_in_the_written_scheme_whole_and_split():
    from napari_spinesegdiff.labelscheme import merge_vertebrae

    ph = make_phantom(seed=5)
    whole, split = ph.truth("whole").data, ph.truth("split").data
    post = ph.posterior_elements.data > 0
    assert post.any() and (whole[post] == 2).all() and (split[post] == 4).all()
    assert np.array_equal(merge_vertebrae(split), whole)
    assert np.array_equal(split[~post], ph.labels.data[~post])  # bodies, discs and canal unchanged


# ------------------------------------------------------------------ known deformities and their geometry
def test_deformity_options_default_off_and_the_analytic_shapes_are_the_painted_ones():
    """Without options a phantom is the one of before (tilt 0, no wedge, no slip give the same arrays); with
    them, the analytic label of :class:`Construction` at every voxel centre is the painted label."""
    from napari_spinesegdiff.phantom_geometry import BODY_ID, CANAL_ID, DISC_ID

    plain = make_phantom(4, fov_mm=SMALL_FOV)
    same = make_phantom(4, fov_mm=SMALL_FOV, tilt_deg=0.0, wedge={}, slip={"L3": 0.0})
    np.testing.assert_array_equal(plain.image.data, same.image.data)
    np.testing.assert_array_equal(plain.labels.data, same.labels.data)
    ph = make_phantom(4, tilt_deg=-15, wedge={"L2": 0.4}, slip={"L5": 0.3})
    lab, sp = ph.labels.canonical(), ph.labels.orientation.canonical_spacing
    rows, cols = np.mgrid[0:lab.shape[1], 0:lab.shape[2]]
    for k in (3, 6, 9):
        ids = ph.construction.ids((rows * sp[1]).ravel(), (cols * sp[2]).ravel(),
                                  (k - (lab.shape[0] - 1) / 2) * sp[0]).reshape(rows.shape)
        classes = np.select([ids == CANAL_ID, (ids >= BODY_ID) & (ids < DISC_ID), (ids >= DISC_ID) & (ids < CANAL_ID)],
                            [1, 2, 3], 0)
        np.testing.assert_array_equal(classes, lab[k])


def test_geometry_of_a_wedge_a_slip_and_a_tilt():
    """The constructed measures: the wedged body's anterior height is lost linearly (90 % of the wedge at 10 %
    of the depth, 10 % at 90 %, less the endplates' concavity, which the wedge keeps), its neighbours keep
    ratios near 1; the slip is the asked share of the lower
    body's depth and the other levels do not slip; turning the column leaves every body and disc measure
    as it was (a rigid rotation), and the disc heights follow _DISC_H (degenerated discs lower)."""
    base = make_phantom(6).geometry
    wedged = make_phantom(6, wedge={"L1": 0.35}).geometry
    ratio = wedged["L1"]["height_anterior_mm"] / base["L1"]["height_anterior_mm"]
    assert ratio == pytest.approx(1 - 0.9 * 0.35, abs=0.03)
    assert wedged["L1"]["height_posterior_mm"] / base["L1"]["height_posterior_mm"] == pytest.approx(1 - 0.035, abs=0.01)
    assert wedged["L1"]["wedge_ratio"] < 0.75
    assert all(0.97 < wedged[n]["wedge_ratio"] < 1.03 for n in ("T12", "L2", "L3", "L4", "L5"))
    slipped = make_phantom(6, slip={"L4": 0.25}).geometry
    # the shift is 25 % of L5's nominal depth; its endplate, 3 mm inside the body, is a little shallower
    assert 25.0 <= slipped["L4"]["slip_percent"] <= 27.5
    assert all(abs(slipped[n]["slip_percent"]) < 1.5 for n in ("T12", "L1", "L2", "L3", "L5"))
    assert all(abs(base[n]["slip_percent"]) < 1.5 for n in BODY_NAMES[:6])
    turned = make_phantom(6, tilt_deg=10).geometry
    for name in BODY_NAMES[:6] + DISC_NAMES:
        for key in ("height_anterior_mm", "height_middle_mm", "height_posterior_mm", "depth_mm"):
            assert turned[name][key] == pytest.approx(base[name][key], abs=2e-3), (name, key)
    assert base["S1"] == {}
    degenerated = make_phantom(6, degenerated=["L4/L5"]).geometry
    assert degenerated["L4/L5"]["height_middle_mm"] < 0.7 * base["L4/L5"]["height_middle_mm"]
    assert 6.0 < base["L3/L4"]["height_middle_mm"] < 18.0 and 30.0 < base["L3"]["depth_mm"] < 45.0
    assert all(12.0 < base[n]["ap_diameter_mm"] < 20.0 for n in DISC_NAMES)


def test_bad_deformities_are_refused():
    with pytest.raises(ValueError, match="wedge"):
        make_phantom(0, wedge={"S1": 0.3})
    with pytest.raises(ValueError, match="between"):
        make_phantom(0, slip={"L4": 1.5})
    with pytest.raises(ValueError, match="tilt_deg"):
        make_phantom(0, tilt_deg=45)
