import numpy as np
import pytest
from pydicom.uid import SecondaryCaptureImageStorage
from writers_data import MODEL, boxes, fake_result, identity, needs_dciodvfy, rg1, roundtrip

from node.writers import sc as sc_writer
from node.writers._common import COLOURS
from node.writers.sc import build_overlay_sc, render_overlay
from node.writers.validate import ValidationFailed, check, validate


@pytest.fixture(scope="module")
def sc(source):
    result = fake_result(source.Rows, source.Columns)
    result.boxes = boxes(source.Rows, source.Columns)
    return build_overlay_sc(source, result, MODEL, **identity("sc"))


def test_sc_round_trips_as_rgb_in_source_study(source, sc):
    back = roundtrip(sc)
    assert back.SOPClassUID == SecondaryCaptureImageStorage
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.SeriesInstanceUID != source.SeriesInstanceUID
    assert back.PhotometricInterpretation == "RGB" and back.BurnedInAnnotation == "YES"
    assert back.pixel_array.shape == (source.Rows, source.Columns, 3)
    assert back.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert MODEL.version in back.SeriesDescription and "(DEMO)" in back.SeriesDescription
    assert "AI RESULT" in back.ImageComments
    assert (back.ManufacturerModelName, back.SoftwareVersions) == (MODEL.name, MODEL.version)


def test_banner_and_each_kind_of_outline_are_burned_in(sc):
    pixels = sc.pixel_array.reshape(-1, 3)
    top_left = sc.pixel_array[:5, :50].reshape(-1, 3)
    assert (top_left == sc_writer.BANNER_RGB).all(axis=1).mean() > 0.9
    for kind, rgb in COLOURS.items():
        assert (pixels == rgb).all(axis=1).sum() > 100, kind


@needs_dciodvfy
def test_sc_has_no_dciodvfy_errors(sc):
    assert validate(sc) == []


def test_large_images_are_downscaled_to_max_side():
    pixels = render_overlay(fake_result(3000, 2400), MODEL)
    assert pixels.shape == (2048, 1638, 3) and pixels.dtype == np.uint8


def test_without_heatmaps_the_image_is_not_tinted():
    result = fake_result(600, 500)
    result.heatmaps = {}
    pixels = render_overlay(result, MODEL).astype(int)
    middle = pixels[250:350, 232:268]  # between the lungs: no outline, no text
    assert (middle[..., 0] == middle[..., 1]).all() and (middle[..., 1] == middle[..., 2]).all()


@needs_dciodvfy
def test_gate_catches_wrong_sop_class(sc):
    broken = roundtrip(sc)
    broken.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage
    broken.file_meta.MediaStorageSOPClassUID = broken.SOPClassUID
    with pytest.raises(ValidationFailed, match=r"dciodvfy: Error - .*(CR|Computed Radiography)"):
        check(broken)


@needs_dciodvfy
def test_unknown_orientation_is_sent_empty_not_guessed():
    source = rg1()
    del source.PatientOrientation
    sc = build_overlay_sc(source, fake_result(source.Rows, source.Columns), MODEL, **identity("sc"))
    assert not roundtrip(sc).PatientOrientation  # present, empty
    assert validate(sc) == []


def test_many_heatmaps_are_layered_one_at_a_time():
    """A study with every finding localised: the heat layer is the pixelwise strongest heatmap,
    made holding one overlay-sized array per step, not two per finding (446 MB at 2048 px for
    14 findings before)."""
    import tracemalloc

    rows = cols = 1024
    result = fake_result(rows, cols)
    grids = list(result.heatmaps.values())
    labels = [f.label for f in result.findings if f.label != "No Finding"][:14]
    result.heatmaps = {label: grids[i % len(grids)] for i, label in enumerate(labels)}
    layer_bytes = rows * cols * 4  # float32 at the overlay's size (1024 <= MAX_SIDE)
    tracemalloc.start()
    try:
        many = render_overlay(result, MODEL)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * layer_bytes, f"peak {peak / 2**20:.0f} MiB"
    result.heatmaps = dict(zip(labels, grids, strict=False))  # the same two maps, once each
    few = render_overlay(result, MODEL)
    # the same heat layer; only the list of localised findings written under it differs
    banner_free = slice(many.shape[0] // 4, many.shape[0] * 3 // 4)
    assert np.array_equal(many[banner_free], few[banner_free])
