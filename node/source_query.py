"""Ask the source PACS (C-FIND, Study Root, STUDY level) how many instances a study has.

The answer lets completion fire by rule "count" the moment the last instance is here, instead
of waiting for the quiet time. Any failure means "unknown": the quiet timer still applies.
"""

from __future__ import annotations

import logging

from pydicom import Dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]  # generated at import

from node.config import QuerySource
from node.dimse import RequestorAE

log = logging.getLogger(__name__)

PENDING = (0xFF00, 0xFF01)


def study_instance_count(source: QuerySource, study_uid: str, calling_ae: str) -> int | None:
    """Number of Study Related Instances the source PACS reports for study_uid, or None."""
    ae = RequestorAE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = source.timeout
    ae.connection_timeout = source.timeout
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study_uid
    query.NumberOfStudyRelatedInstances = None
    assoc = ae.associate(source.host, source.port, ae_title=source.ae_title)
    if not assoc.is_established:
        log.warning("C-FIND to %s at %s:%d: association not established", source.ae_title, source.host, source.port)
        return None
    counts: list[int] = []
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            if status is None:  # timed out or aborted
                log.warning("C-FIND to %s for study %s got no answer", source.ae_title, study_uid)
                return None
            if int(status.Status) in PENDING and identifier is not None:
                value = identifier.get("NumberOfStudyRelatedInstances")
                if value not in (None, ""):
                    counts.append(int(value))
    finally:
        assoc.release()
    if len(counts) != 1:
        log.info("C-FIND to %s for study %s: %d matches, count unknown", source.ae_title, study_uid, len(counts))
        return None
    return counts[0]
