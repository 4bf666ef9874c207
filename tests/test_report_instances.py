"""Instances and level names: phantoms of known levels named right, anchors, flags, renumbering, SPIDER values."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from napari_spinesegdiff.phantom import Phantom, make_phantom
from napari_spinesegdiff.report.instances import (
    CANAL_VALUE,
    SACRUM_VALUE,
    InstancesError,
    Instances,
    find_instances,
    instances_from_spider,
    read_any_labels,
)

TALL_FOV = (45.5, 280.0, 180.0)  # T12 to S3: the sacrum in view (the default 220 mm cuts S1 in half)
# SPIDER: vertebrae numbered from the bottom (L5 = 1), discs 200 + the vertebra above (L5/S1 = 201)
SPIDER = {"T12": 6, "L1": 5, "L2": 4, "L3": 3, "L4": 2, "L5": 1, "S1": SACRUM_VALUE, "T12-L1": 206, "L1-L2": 205,
          "L2-L3": 204, "L3-L4": 203, "L4-L5": 202, "L5-S1": 201}


@pytest.fixture(scope="module")
def phantoms() -> dict:
    cache: dict = {}

    def get(seed: int, **kw) -> Phantom:
        key = (seed, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = make_phantom(seed, **kw)
        return cache[key]

    return get  # type: ignore[return-value]


def named_at_levels(inst: Instances, ph: Phantom, lab_shape, rows: slice | None = None) -> dict[str, str | None]:
    """Phantom level name -> the name of the structure at its centre (mid-sagittal slice)."""
    out = {}
    mid = lab_shape[0] // 2
    r0 = 0 if rows is None else rows.start
    for lev in ph.levels:
        r, c = int(round(lev.row)) - r0, int(round(lev.column))
        if not (0 <= r < lab_shape[1]):
            continue
        v = int(inst.canonical[mid, r, c])
        out[lev.name.replace("/", "-")] = inst.by_value(v).level if v else None
    return out


@pytest.mark.parametrize("seed,vertebrae", [(1, "whole"), (2, "split"), (4, "whole"), (5, "split")])
def test_phantom_levels_named_right_with_the_sacrum_anchor(phantoms, seed, vertebrae):
    ph = phantoms(seed, fov_mm=TALL_FOV, random_orientation=True)
    lab = ph.truth(vertebrae).canonical()
    inst = find_instances(lab, ph.labels.orientation.canonical_spacing, vertebrae=vertebrae)
    named = named_at_levels(inst, ph, lab.shape)
    assert named == {k: k for k in named} and len(named) == 13
    assert inst.anchor == "sacrum" and "sacrum_out_of_view" not in inst.flags
    for name, value in SPIDER.items():
        s = inst.by_level(name)
        assert s.value == value and 0.75 <= s.level_confidence <= 1.0
    # every bone and disc voxel belongs to a structure; vertebrae hold their posterior elements
    assert np.all((inst.canonical > 0) == (lab > 0))
    assert [s.structure for s in inst.structures] == ["vertebra"] * 7 + ["disc"] * 6 + ["canal"]
    post = ph.posterior_elements.canonical() > 0
    for lev in ("L2", "L3", "L4"):
        s = inst.by_level(lev)
        assert (inst.mask(s.value) & post).sum() > 0.3 * (lab[post] > 0).sum() / 7
    # confidences fall with the distance from the anchor
    conf = [inst.by_level(n).level_confidence for n in ("S1", "L5", "L3", "L1", "T12")]
    assert conf == sorted(conf, reverse=True)


def test_posterior_elements_go_to_their_own_vertebra(phantoms):
    """Whole vertebrae touch their neighbours at the facets; the split truth says which arch is whose."""
    ph = phantoms(3, fov_mm=TALL_FOV)
    sp = ph.labels.orientation.canonical_spacing
    whole = find_instances(ph.truth("whole").canonical(), sp)
    split_lab = ph.truth("split").canonical()
    split = find_instances(split_lab, sp, vertebrae="split")
    post = split_lab == 4
    agree = (whole.canonical[post] == split.canonical[post]).mean()
    assert agree > 0.97, agree


def test_sacrum_out_of_view_counts_from_the_lowest_disc(phantoms):
    ph = phantoms(6, fov_mm=TALL_FOV)
    lab = ph.truth().canonical()
    below = int(round(ph.level("L5/S1").row)) + 14  # keep a sliver of S1 under the L5-S1 disc
    rows = slice(0, below)
    cropped = lab[:, rows]
    inst = find_instances(cropped, ph.labels.orientation.canonical_spacing)
    assert inst.anchor == "lowest disc" and "sacrum_out_of_view" in inst.flags
    named = named_at_levels(inst, ph, cropped.shape, rows)
    assert named == {k: k for k in named} and "L5-S1" in named
    assert all(s.level_confidence <= 0.6 for s in inst.structures if s.structure != "canal")
    assert "cut_by_fov" in inst.by_level("S1").flags
    # the default phantom's 220 mm field of view cuts S1 in half: the same anchor
    ph0 = phantoms(0)
    assert find_instances(ph0.truth().canonical(), ph0.labels.orientation.canonical_spacing).anchor == "lowest disc"


def test_renumbering_moves_names_and_values(phantoms):
    ph = phantoms(1, fov_mm=TALL_FOV)
    lab, sp = ph.truth().canonical(), ph.labels.orientation.canonical_spacing
    inst = find_instances(lab, sp)
    down = inst.renumbered(1)
    l4 = inst.by_level("L4")
    moved = down.by_value(1)  # L5's value now names the structure that was L4
    assert moved.level == "L5" and moved.centroid == l4.centroid
    assert np.array_equal(down.mask(1), inst.mask(l4.value))
    assert down.by_level("L4-L5").centroid == inst.by_level("L3-L4").centroid
    assert down.by_level("S1").centroid == inst.by_level("L5").centroid
    assert "no_spider_value" in down.by_level("S2").flags and "renumbered:+1" in down.flags
    assert not np.any(down.canonical[inst.mask(SACRUM_VALUE)])  # the old sacrum (now S2) has no SPIDER value
    up = inst.renumbered(-1)
    assert up.by_level("T11").centroid == inst.by_level("T12").centroid and up.by_value(7).level == "T11"
    assert np.array_equal(down.renumbered(0).canonical, inst.canonical)
    assert down.renumbered(0).structures == inst.structures
    same = find_instances(lab, sp, shift=1)
    assert same.structures == down.structures and np.array_equal(same.canonical, down.canonical)


def test_a_missing_disc_is_flagged_and_the_names_above_it_stay(phantoms):
    ph = phantoms(2, fov_mm=TALL_FOV)
    lab = ph.truth().canonical().copy()
    comp, _ = ndimage.label(lab == 3)
    lev = ph.level("L2/L3")
    lab[comp == comp[lab.shape[0] // 2, int(round(lev.row)), int(round(lev.column))]] = 0
    inst = find_instances(lab, ph.labels.orientation.canonical_spacing)
    assert "missing_disc:L2-L3" in inst.flags
    named = named_at_levels(inst, ph, lab.shape)
    del named["L2-L3"]
    assert named == {k: k for k in named}
    full = find_instances(ph.truth().canonical(), ph.labels.orientation.canonical_spacing)
    assert inst.by_level("L1").level_confidence < full.by_level("L1").level_confidence


def test_an_extra_disc_is_flagged_not_counted(phantoms):
    ph = phantoms(4, fov_mm=TALL_FOV)
    lab = ph.truth().canonical().copy()
    lev = ph.level("L3")
    r, c, mid = int(round(lev.row)), int(round(lev.column)), lab.shape[0] // 2
    lab[mid - 3:mid + 4, r - 5:r + 5, c - 22:c + 22] = 3  # a disc-like slab inside the L3 body
    inst = find_instances(lab, ph.labels.orientation.canonical_spacing)
    assert any(f.startswith("extra_disc") for f in inst.flags)
    named = named_at_levels(inst, ph, lab.shape)
    del named["L3"]
    assert named == {k: k for k in named}


def test_six_lumbar_vertebrae_when_asked(phantoms):
    ph = phantoms(1, fov_mm=TALL_FOV)
    inst = find_instances(ph.truth().canonical(), ph.labels.orientation.canonical_spacing, lumbar=6)
    at = named_at_levels(inst, ph, ph.labels.canonical().shape)
    assert at["L5"] == "L6" and at["T12"] == "L1" and at["L5-S1"] == "L6-S1" and "lumbar:6" in inst.flags
    assert inst.by_level("L6").value == 1


def test_spider_scheme_round_trip(phantoms):
    ph = phantoms(5, fov_mm=TALL_FOV)
    sp = ph.labels.orientation.canonical_spacing
    inst = find_instances(ph.truth().canonical(), sp)
    back = read_any_labels(inst.canonical, sp)
    assert back.anchor == "spider"
    assert [(s.value, s.structure, s.level) for s in back.structures] == \
        [(s.value, s.structure, s.level) for s in inst.structures]
    assert np.array_equal(back.canonical, inst.canonical)
    assert np.array_equal(back.classes > 0, inst.canonical > 0) and set(np.unique(back.classes)) == {0, 1, 2, 3}
    # the other convention seen in SPIDER masks: the sacrum is vertebra 1 and L5 is 2
    alt = inst.canonical.copy()
    vert = (alt >= 1) & (alt < SACRUM_VALUE)
    alt[vert] += 1
    alt[inst.canonical == SACRUM_VALUE] = 1
    other = instances_from_spider(alt, sp)
    assert [(s.value, s.level) for s in other.structures] == [(s.value, s.level) for s in inst.structures]
    assert "spider:sacrum_as_1" in other.flags
    # partially visible vertebrae (101-125) are their vertebra, cut by the field of view
    part = inst.canonical.copy()
    part[part == 6] = 106
    t12 = instances_from_spider(part, sp).by_level("T12")
    assert t12.value == 6 and "cut_by_fov" in t12.flags
    # the project's class scheme is told apart from SPIDER's
    assert read_any_labels(ph.truth("split").canonical(), sp).anchor == "sacrum"


@pytest.mark.parametrize("array,spacing,needle", [
    (np.zeros((4, 4), np.uint8), (1, 1, 1), "must be 3-D"),
    (np.full((2, 3, 3), 0.5), (1, 1, 1), "whole numbers"),
    (np.full((2, 3, 3), -1), (1, 1, 1), "negative"),
    (np.full((2, 3, 3), 42), (1, 1, 1), "42, which is not a SPIDER value"),
    (np.zeros((2, 3, 3), np.uint8), (1, 0, 1), "spacing"),
])
def test_bad_input_is_refused_in_one_sentence(array, spacing, needle):
    with pytest.raises(InstancesError) as err:
        read_any_labels(array, spacing)
    msg = str(err.value)
    assert needle in msg and msg.endswith(".") and "\n" not in msg


def test_bad_options_are_refused():
    lab = np.zeros((2, 3, 3), np.uint8)
    with pytest.raises(InstancesError, match="vertebrae must be"):
        find_instances(lab, (1, 1, 1), vertebrae="bodies")
    with pytest.raises(InstancesError, match="lumbar must be 5 or 6"):
        find_instances(lab, (1, 1, 1), lumbar=4)
    with pytest.raises(InstancesError, match="not a class of the project's scheme"):
        find_instances(np.full((2, 3, 3), 5, np.uint8), (1, 1, 1))


def test_empty_and_canal_only_maps():
    empty = find_instances(np.zeros((3, 8, 8), np.uint8), (1, 1, 1))
    assert empty.structures == () and not empty.canonical.any()
    canal = np.zeros((3, 8, 8), np.uint8)
    canal[:, 2:6, 3:5] = 1
    inst = find_instances(canal, (1, 1, 1))
    assert [s.level for s in inst.structures] == ["canal"] and inst.by_value(CANAL_VALUE).n_voxels == 24


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory):
    from napari_spinesegdiff.io.writers import write_volume

    d = tmp_path_factory.mktemp("instances_cli")
    ph = make_phantom(seed=8, contrast="T1w", random_orientation=True)
    img = write_volume(ph.image.data, d / "scan.nii.gz", like=ph.image, kind="image", produced_by="test")
    return img, ph


def test_cli_writes_the_instance_map_in_the_scans_geometry(scan_file, tmp_path):
    import nibabel as nib

    from napari_spinesegdiff.cli import main
    from napari_spinesegdiff.io.readers import read_volume

    img, ph = scan_file
    out, inst_path = tmp_path / "labels.nii.gz", tmp_path / "instances.nii.gz"
    assert main(["segment", str(img), "-o", str(out), "--instances", str(inst_path), "--steps", "3",
                 "--ensemble", "2", "--slices", "4:9", "--no-progress"]) == 0
    src, written = nib.load(img), nib.load(inst_path)
    assert written.shape == src.shape
    np.testing.assert_allclose(written.affine, src.affine, atol=1e-5)
    labels = read_volume(out, kind="labels")
    inst_vol = read_volume(inst_path, kind="labels")
    expected = find_instances(labels.canonical(), labels.orientation.canonical_spacing)
    assert np.array_equal(inst_vol.canonical(), expected.canonical)
    values = set(np.unique(inst_vol.data).tolist()) - {0}
    assert CANAL_VALUE in values and {1, 2, 3, 201, 202} <= values
    assert all(v == CANAL_VALUE or 1 <= v <= 25 or 201 <= v <= 225 for v in values)
    # on the model's labels, the structures at the phantom's level centres are named right
    named = named_at_levels(expected, ph, labels.canonical().shape)
    assert named == {k: k for k in named}


def test_cli_refuses_a_bad_instances_path_before_the_run(scan_file, tmp_path, capsys):
    from napari_spinesegdiff.cli import main

    img, _ = scan_file
    before = img.read_bytes()
    code = main(["segment", str(img), "-o", str(tmp_path / "l.nii.gz"), "--instances", str(img), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "is the input scan" in err and len(err.splitlines()) == 1
    assert img.read_bytes() == before and not (tmp_path / "l.nii.gz").exists()
    code = main(["segment", str(img), "-o", str(tmp_path / "l.nii.gz"), "--instances",
                 str(tmp_path / "l.nii.gz"), "--no-progress"])
    assert code == 2 and not (tmp_path / "l.nii.gz").exists()



@pytest.mark.parametrize("pad", [((0, 0), (0, 0), (0, 0)), ((0, 0), (25, 5), (7, 40))])
def test_naming_on_the_foregrounds_box_changes_nothing(phantoms, pad):
    """Structures are found on the foreground's rows and columns: the same names, values, flags, confidences,
    map and centroids as on the whole field of view, with or without empty space, cut by the edge or not."""
    from napari_spinesegdiff.report.instances import _find

    ph = phantoms(2)
    lab = np.pad(ph.labels.canonical(), pad)
    sp = ph.labels.orientation.canonical_spacing
    for cut in (slice(None), slice(pad[1][0] + 60, None)):
        a, b = find_instances(lab[:, cut], sp), _find(lab[:, cut], sp, "whole", 5)
        assert a.anchor == b.anchor and a.flags == b.flags
        np.testing.assert_array_equal(a.canonical, b.canonical)
        for sa, sb in zip(a.structures, b.structures, strict=True):
            assert (sa.level, sa.value, sa.flags, sa.level_confidence, sa.n_voxels) == \
                (sb.level, sb.value, sb.flags, sb.level_confidence, sb.n_voxels)
            np.testing.assert_allclose(sa.centroid, sb.centroid)
        assert cut == slice(None) or "cut_by_fov" in {f for st in a.structures for f in st.flags}
