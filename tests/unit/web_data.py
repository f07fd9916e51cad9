"""A study as the node leaves it after a job: a real radiograph received through `ingest`, and a
done job whose SR and overlay SC were built by our own writers and stored in the spool."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from io import BytesIO

from pydicom import Dataset

from node.config import Config
from node.db.models import Job, JobState, Output, Send, SendState, Study, StudyState, utcnow
from node.db.session import session_scope
from node.handlers import IngestContext, ingest
from node.spool import output_relpath, write_atomic
from node.writers.sc import build_overlay_sc
from node.writers.sr import build_comprehensive_3d_sr
from tests.unit.writers_data import MODEL, fake_result, identity, jpeg_source, probabilities


@dataclass
class ResultStudy:
    study_uid: str
    job_id: int
    sr_output: int
    sc_output: int
    source: Dataset


def _bytes(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def study_with_results(config: Config, patient_name: str = "Doe^Jane", job_state: JobState = JobState.DONE,
                       tag: str = "1") -> ResultStudy:
    """Ingest the cxr-sample radiograph (as a C-STORE would) with this Patient Name, then record a
    job in `job_state` with its SR and overlay SC written to the spool and sent to `pacs`."""
    source = jpeg_source()
    source.PatientName = patient_name
    source.PatientID = f"PID-{tag}"
    source.AccessionNumber = f"ACC-{tag}"
    for attr in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(source, attr, f"{getattr(source, attr)}.{tag}")
    source.file_meta.MediaStorageSOPInstanceUID = source.SOPInstanceUID
    study_uid, _ = ingest(_bytes(source), IngestContext(config), "MODALITY")
    result = fake_result(source.Rows, source.Columns)
    objects = [("sr", build_comprehensive_3d_sr([source], [result], MODEL, **identity("sr", tag))),
               ("sc", build_overlay_sc(source, result, MODEL, **identity("sc", tag)))]
    now = utcnow()
    with session_scope(config.database.url) as s:
        study = s.query(Study).filter_by(study_instance_uid=study_uid).one()
        study.state, study.completed_at, study.completion_rule = StudyState.COMPLETE, now, "quiet"
        stamps = {f"{st}_at": now + timedelta(seconds=i) for i, st in enumerate(("queued", "running", "encoded", "sending"))}
        job = Job(study_id=study.id, pipeline="chest_xray", model_version=MODEL.version, state=job_state, attempt=1,
                  instance_ids=[], timings={"read": 0.05, "pipeline": 0.4, "encode": 0.2, "validate": 0.05},
                  created_at=now, updated_at=now, **stamps,
                  **({"done_at": now + timedelta(seconds=5)} if job_state == JobState.DONE else {}))
        s.add(job)
        s.flush()
        ids = {}
        for index, (kind, ds) in enumerate(objects):
            rel = output_relpath(job.id, kind, index)
            write_atomic(config.storage.path, rel, _bytes(ds))
            out = Output(job_id=job.id, kind=kind, sop_class_uid=str(ds.SOPClassUID), sop_instance_uid=str(ds.SOPInstanceUID),
                         series_instance_uid=str(ds.SeriesInstanceUID), path=rel)
            s.add(out)
            s.flush()
            s.add(Send(output_id=out.id, destination="pacs", state=SendState.SENT, attempts=1, remote_status=0,
                       sent_at=now + timedelta(seconds=4), confirmed_at=now + timedelta(seconds=5)))
            ids[kind] = out.id
        return ResultStudy(study_uid, job.id, ids["sr"], ids["sc"], source)


__all__ = ["ResultStudy", "probabilities", "study_with_results"]
