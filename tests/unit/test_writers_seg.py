import numpy as np
import pytest
from highdicom.color import CIELabColor
from pydicom.uid import SegmentationStorage
from writers_data import MODEL, dx_source, fake_result, identity, needs_dciodvfy, rg1, roundtrip

from node.writers import codes
from node.writers._common import COLOURS
from node.writers.seg import NOMINAL_ORIENTATION, NOMINAL_SPACING, build_segmentation, pixel_spacing
from node.writers.validate import validate


@pytest.fixture(scope="module")
def result(source):
    return fake_result(source.Rows, source.Columns)


@pytest.fixture(scope="module")
def seg(source, result):
    return build_segmentation(source, result, MODEL, **identity("seg"))


def test_seg_round_trips_with_the_mask(source, result, seg):
    back = roundtrip(seg)
    assert back.SOPClassUID == SegmentationStorage
    assert back.StudyInstanceUID == source.StudyInstanceUID
    assert back.SegmentationType == "BINARY"
    np.testing.assert_array_equal(back.pixel_array.astype(bool), result.regions["lungs"])
    segment = back.SegmentSequence[0]
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.LUNG.value
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (MODEL.name, MODEL.version)
    frame = back.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert frame.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert (back.ManufacturerModelName, back.SoftwareVersions) == (MODEL.name, MODEL.version)


def test_seg_has_what_ohifs_seg_loader_reads(source, seg):
    """Pixel Measures (destructured by the SEG viewport), Plane Orientation equal to the one OHIF
    assumes for the source (read by @cornerstonejs/adapters' checkOrientation), segment label
    and recommended colour (the segmentation panel)."""
    shared = roundtrip(seg).SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == list(pixel_spacing(source))
    orientation = [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    assert orientation == list(NOMINAL_ORIENTATION)  # none of the sources has one
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "Lung fields (AI)"
    assert list(segment.RecommendedDisplayCIELabValue) == list(CIELabColor.from_rgb(*COLOURS["region"]).value)


def test_pixel_spacing_prefers_pixel_spacing_then_imager_pixel_spacing_then_nominal():
    source = rg1()  # stores PixelSpacing 0\0 and no Imager Pixel Spacing
    assert pixel_spacing(source) == NOMINAL_SPACING
    assert pixel_spacing(dx_source()) == (0.168, 0.168)
    source.ImagerPixelSpacing = [0.2, 0.2]
    assert pixel_spacing(source) == (0.2, 0.2)
    source.PixelSpacing = [0.14, 0.15]
    assert pixel_spacing(source) == (0.14, 0.15)


def test_zero_pixel_spacing_of_source_is_not_copied():
    source = rg1()  # stores PixelSpacing 0\0
    seg = build_segmentation(source, fake_result(source.Rows, source.Columns), MODEL, **identity("seg"))
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    assert [float(v) for v in measures.PixelSpacing] == list(NOMINAL_SPACING)
    assert source.PixelSpacing == [0, 0]  # the caller's dataset is untouched


@needs_dciodvfy
def test_seg_has_no_dciodvfy_errors(seg):
    assert validate(seg) == []


def test_empty_regions_are_rejected(source):
    result = fake_result(source.Rows, source.Columns)
    result.regions["lungs"][:] = False
    with pytest.raises(ValueError, match=r"no region of .* has any pixel \(regions: \['lungs'\]\)"):
        build_segmentation(source, result, MODEL, **identity("seg"))
