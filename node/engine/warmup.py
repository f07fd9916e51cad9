"""A study that never was, run by a starting inference worker so that its first real study does
not pay for what Python, pydicom, highdicom and the pipeline load or specialise on first use.

Measured on the 2-core VM before it (bench/turnaround.py, the first study after the node
started, against the medians of the next ones): decode 70 vs 4 ms, the pipeline 164 vs 83 ms,
every object's encoding 386-460 vs ~140 ms (#12): lazy loading, and the first touch of each large
array's pages; with it, the first study's encoding took 149 ms. Nothing of the warm-up is
stored, validated by the external tools or sent: the objects are built and written to bytes in
memory, then dropped.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable
from io import BytesIO

import numpy as np
from pydicom import Dataset, dcmread

from pipelines.base import Pipeline

log = logging.getLogger(__name__)

#: Rows and columns of the synthetic radiograph: a radiograph's size (RG1 is 1955 x 1841), so
#: the arrays a study needs are allocated once here, and kept by the allocator for the first
#: study (node/engine/malloc.py, set before the warm-up). At 512 px the first study still took
#: 414 ms to encode its objects against 172 for the next (in-process, RG1); at 2048, 163 vs 155.
SIZE = 2048


def synthetic_radiograph() -> Dataset:
    """A MONOCHROME2 Secondary Capture of a smooth synthetic chest-like pattern, as received."""
    import highdicom as hd

    from node.writers.uids import result_uid

    y, x = np.mgrid[-1:1:SIZE * 1j, -1:1:SIZE * 1j]
    lungs = np.exp(-(((np.abs(x) - 0.45) / 0.25) ** 2 + (y / 0.6) ** 2))  # two bright ellipses
    pixels = (255 * (0.2 + 0.7 * lungs)).astype(np.uint8)
    sc = hd.sc.SCImage(
        pixel_array=pixels, photometric_interpretation="MONOCHROME2", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=("L", "F"),
        study_instance_uid=result_uid("warm-up", "study"), series_instance_uid=result_uid("warm-up", "series"),
        sop_instance_uid=result_uid("warm-up", "image"), series_number=1, instance_number=1,
        manufacturer="pacsnode", patient_id="WARM-UP", patient_name="Warm^Up", patient_sex="O",
        patient_birth_date="20000101", accession_number="WARM-UP", study_id="1", study_date="20000101",
        study_time="000000", referring_physician_name="Warm^Up",
    )
    buffer = BytesIO()
    sc.save_as(buffer, enforce_file_format=True)
    return dcmread(BytesIO(buffer.getvalue()))


def warm_up(pipeline: Pipeline) -> list[str]:
    """Run ``pipeline`` on ``synthetic_radiograph()`` and build and encode every kind of result
    object from it; return the kinds built. A step that fails is logged and skipped: the worker
    still starts, and its first study pays for what was not warmed."""
    from node.writers import validate
    from node.writers.gsps import build_presentation_state
    from node.writers.sc import build_overlay_sc
    from node.writers.seg import build_segmentation, segmented_regions
    from node.writers.sr import build_comprehensive_3d_sr
    from node.writers.uids import result_uid

    source = synthetic_radiograph()
    try:
        [result] = pipeline.run([source])
    except Exception as e:  # noqa: BLE001 - as below
        log.warning("warm-up: %s failed on the synthetic radiograph (%s: %s); the first study pays for loading it",
                    pipeline.model.name, type(e).__name__, e)
        return []
    builders: dict[str, Callable[..., Dataset]] = {
        "sr": lambda **ids: build_comprehensive_3d_sr([source], [result], pipeline.model, **ids),
        "seg": lambda **ids: build_segmentation(source, result, pipeline.model, **ids),
        "gsps": lambda **ids: build_presentation_state(source, result, pipeline.model, **ids),
        "sc": lambda **ids: build_overlay_sc(source, result, pipeline.model, **ids),
    }
    built = []
    for kind, build in builders.items():
        if kind == "seg" and not segmented_regions(result):
            continue  # as the engine does: no SEG without a region
        try:
            ds = build(series_instance_uid=result_uid("warm-up", kind, "series"),
                       sop_instance_uid=result_uid("warm-up", kind), series_number=1, instance_number=1,
                       content_datetime=datetime.datetime.now())
            validate.encode(ds)
        except Exception as e:  # noqa: BLE001 - a warm-up never stops a worker; the first study pays instead
            log.warning("warm-up: the %s was not built (%s: %s); the first study pays for loading it",
                        kind.upper(), type(e).__name__, e)
            continue
        built.append(kind)
    return built
