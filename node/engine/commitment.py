"""Storage Commitment results: what a destination's N-EVENT-REPORT does to our sends.

A destination with `confirm: commitment` is asked (N-ACTION, by the export task: node/export.py
`request_commitment`) to commit to keeping the objects just stored there; each such send waits
in state `committing` under the request's Transaction UID. The destination answers later on a
new association to the listener (PS3.4 J.3.3): the listener admits that association only from
a configured commitment destination (`commitment_peer`), only for this SOP class, with us in
the SCU role, and hands the report to `handle_report`. Committed objects are sent; refused ones
are stored again by the next export attempt, until `export.max_retries` attempts, when the job
fails at stage `confirm` naming them. The job is done only when every object is committed.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import cast

from pydicom import Dataset
from pynetdicom import evt
from pynetdicom.dimse_primitives import N_EVENT_REPORT
from pynetdicom.status import GENERAL_STATUS
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from node.config import Config, Destination
from node.db.models import Job, JobState, Output, Send, SendState, utcnow
from node.db.session import session_scope
from node.engine.errors import Stage
from node.jobs import finish_if_delivered, move_send, transition

log = logging.getLogger(__name__)

# N-EVENT-REPORT Event Type IDs of Storage Commitment (PS3.4 J.3.3.1): all committed; some failed.
ALL_COMMITTED, SOME_FAILED = 1, 2
# N-EVENT-REPORT response statuses (PS3.7 10.1.1.1.8).
SUCCESS, PROCESSING_FAILURE, NO_SUCH_EVENT_TYPE, INVALID_ARGUMENT = 0x0000, 0x0110, 0x0113, 0x0115


@dataclass(frozen=True)
class CommitmentReport:
    """One Storage Commitment result: which objects the destination committed, which it did not."""

    transaction_uid: str
    committed: frozenset[str] = frozenset()  # SOP Instance UIDs
    failed: Mapping[str, int] = field(default_factory=dict)  # SOP Instance UID -> Failure Reason


def read_report(info: Dataset) -> CommitmentReport:
    """The report in an N-EVENT-REPORT's Event Information; ValueError when it names no transaction."""
    uid = str(info.get("TransactionUID", "") or "").strip()
    if not uid:
        raise ValueError("Event Information has no Transaction UID")
    committed = frozenset(str(i.ReferencedSOPInstanceUID) for i in info.get("ReferencedSOPSequence", [])
                          if "ReferencedSOPInstanceUID" in i)
    failed = {str(i.ReferencedSOPInstanceUID): int(i.get("FailureReason", PROCESSING_FAILURE))
              for i in info.get("FailedSOPSequence", []) if "ReferencedSOPInstanceUID" in i}
    return CommitmentReport(uid, committed, failed)


def failure_reason(code: int) -> str:
    """A Failure Reason as the operator reads it, e.g. '0x0112 (No such object instance)'."""
    known = GENERAL_STATUS.get(code)
    return f"0x{code:04X} ({known[1]})" if known else f"0x{code:04X}"


def _addresses(host: str) -> set[str]:
    """The addresses a destination's host stands for (resolved: a destination may be named)."""
    try:
        return {str(ipaddress.ip_address(host))}
    except ValueError:
        pass
    try:
        return {str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)}
    except OSError as e:
        log.warning("cannot resolve destination host %s: %s", host, e)
        return set()


def commitment_peer(config: Config, calling_ae: str, address: str) -> Destination | None:
    """The destination with `confirm: commitment` that an association from calling_ae at
    address comes from, or None: only those may report Storage Commitment results."""
    for dest in config.destinations:
        if dest.confirm != "commitment" or dest.ae_title is None or dest.host is None:
            continue
        if dest.ae_title.strip() == calling_ae.strip() and address in _addresses(dest.host):
            return dest
    return None


def record_report(config: Config, destination: str, report: CommitmentReport) -> int:
    """Apply a report to the sends it names (for that destination, under that transaction);
    close the jobs it completes, fail those whose refused objects have no attempts left.
    Return how many sends it settled (0: an unknown or superseded transaction)."""
    settled = 0
    refused: dict[int, list[str]] = {}  # job id -> refused objects with no attempts left
    with session_scope(config.database.url) as s:
        rows = s.execute(
            select(Send, Output).join(Output)
            .where(Send.destination == destination, Send.commitment_uid == report.transaction_uid,
                   Send.state == SendState.COMMITTING)
        ).all()
        touched: set[int] = set()
        for sd, out in rows:
            uid = out.sop_instance_uid
            if uid in report.committed:
                move_send(sd, SendState.SENT, confirmed_at=utcnow(), error=None)
            elif uid in report.failed:
                why = f"storage commitment refused: {failure_reason(report.failed[uid])}"
                move_send(sd, SendState.FAILED, error=why)
                if sd.attempts > config.export.max_retries:
                    refused.setdefault(out.job_id, []).append(f"{out.kind} {uid}: {why}")
            else:
                continue  # not in this report: still awaited, asked again after commitment_wait_seconds
            settled += 1
            touched.add(out.job_id)
        for job_id in sorted(touched):
            job = s.get(Job, job_id)
            assert job is not None
            if job_id in refused and job.state in (JobState.RUNNING, JobState.ENCODED, JobState.SENDING):
                attempts = config.export.max_retries + 1
                message = f"{destination} refused to commit after {attempts} attempts: " + "; ".join(refused[job_id])
                transition(job, JobState.FAILED, error=message[:4000], error_stage=Stage.CONFIRM.value)
                log.error("job %d failed at %s: %s", job_id, Stage.CONFIRM.value, message)
            elif finish_if_delivered(s, job):
                log.info("job %d done: %s committed its objects", job_id, destination)
    if not settled:
        log.warning("storage commitment report from %s for unknown or superseded transaction %s: ignored",
                    destination, report.transaction_uid)
    return settled


def handle_report(event: evt.Event, config: Config) -> tuple[int, Dataset | None]:
    """EVT_N_EVENT_REPORT on the listener: record a Storage Commitment result and answer it."""
    assoc = event.assoc
    calling = str(assoc.requestor.ae_title).strip()
    dest = commitment_peer(config, calling, assoc.requestor.address)
    if dest is None:  # the listener admits only commitment destinations for this SOP class
        log.warning("N-EVENT-REPORT from %s at %s, which is no commitment destination: refused",
                    calling, assoc.requestor.address)
        return PROCESSING_FAILURE, None
    event_type = int(cast(N_EVENT_REPORT, event.request).EventTypeID or 0)
    if event_type not in (ALL_COMMITTED, SOME_FAILED):
        return NO_SUCH_EVENT_TYPE, None
    try:
        report = read_report(event.event_information)
    except (ValueError, TypeError, AttributeError, KeyError) as e:  # pydicom parses lazily: any element may fail
        log.warning("storage commitment report from %s cannot be read: %s", dest.name, e)
        return INVALID_ARGUMENT, None
    try:
        record_report(config, dest.name, report)
    except SQLAlchemyError as e:  # not recorded: the export task asks again later
        log.error("storage commitment report from %s not recorded: %s", dest.name, e)
        return PROCESSING_FAILURE, None
    log.info("storage commitment report from %s: %d committed, %d failed (transaction %s)",
             dest.name, len(report.committed), len(report.failed), report.transaction_uid)
    return SUCCESS, None
