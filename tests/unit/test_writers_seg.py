
import numpy as np
import pytest
from pydicom.uid import SegmentationStorage
from writers_data import MODEL, fake_result, identity, needs_dciodvfy, rg1, roundtrip

from node.writers import codes
from node.writers.seg import build_segmentation
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
    np.testing.assert_array_equal(back.pixel_array.astype(bool), result.lung_mask)
    segment = back.SegmentSequence[0]
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == codes.LUNG.value
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (MODEL.name, MODEL.version)
    frame = back.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert frame.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID


def test_zero_pixel_spacing_of_source_is_not_copied():
    source = rg1()  # stores PixelSpacing 0\0
    seg = build_segmentation(source, fake_result(source.Rows, source.Columns), MODEL, **identity("seg"))
    assert "PixelMeasuresSequence" not in seg.SharedFunctionalGroupsSequence[0]
    assert source.PixelSpacing == [0, 0]  # the caller's dataset is untouched


@needs_dciodvfy
def test_seg_has_no_dciodvfy_errors(seg):
    assert validate(seg) == []


def test_empty_mask_is_rejected(source):
    result = fake_result(source.Rows, source.Columns)
    result.lung_mask[:] = False
    with pytest.raises(ValueError, match="lung mask .* is empty"):
        build_segmentation(source, result, MODEL, **identity("seg"))
