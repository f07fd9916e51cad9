"""The node's own associations (export, read-back, commitment) on the event-driven reactor, and
export associations kept open between sends (node/associations.py, node/export.py).

The peer is a real DICOM SCP on loopback: stock pynetdicom's server, which records every
association it sees and can be told to abort one, the way a PACS restarting or timing out does.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComputedRadiographyImageStorage, Verification

from node.associations import POOL
from node.config import Destination
from node.dimse import RequestorAE, WakingAssociation, WakingDUL
from node.export import DestinationUnavailable, send_files
from tests.peers import free_port, wait_for

RG1 = Path(get_testdata_file("RG1_UNCR.dcm"))


class Peer:
    """Stock pynetdicom SCP (Verification, CR storage) counting associations, releases, aborts
    and stored SOP Instance UIDs. `abort_on` (1-based C-STORE numbers) aborts the association
    from inside the C-STORE handler instead of answering: the request is lost with it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.associations = 0
        self.released = 0
        self.aborted = 0
        self.stores = 0
        self.stored: list[str] = []
        self.abort_on: set[int] = set()
        self.silent = False
        self._lock = threading.Lock()
        ae = AE(ae_title="PEER")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
        ae.add_supported_context(Verification)
        ae.add_supported_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_ESTABLISHED, self._count, ["associations"]), (evt.EVT_RELEASED, self._count, ["released"]),
            (evt.EVT_ABORTED, self._count, ["aborted"]), (evt.EVT_C_STORE, self._store),
            (evt.EVT_C_ECHO, self._echo)])

    def _count(self, event: evt.Event, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def _echo(self, event: evt.Event) -> int:
        if self.silent:
            threading.Event().wait(3)  # longer than the requestor's DIMSE timeout below
        return 0

    def _store(self, event: evt.Event) -> int:
        with self._lock:
            self.stores += 1
            n = self.stores
        if n in self.abort_on:
            event.assoc.abort()
            return 0xA700  # never reaches the requestor: the association is gone
        self.stored.append(str(event.dataset.SOPInstanceUID))
        return 0

    def open_associations(self) -> list[Any]:
        return [a for a in self.server.active_associations if a.is_established]

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def peer() -> Iterator[Peer]:
    p = Peer()
    yield p
    POOL.close_all()
    p.stop()


def _destination(peer: Peer, timeout: float = 10) -> Destination:
    return Destination(name="peer", ae_title="PEER", host="127.0.0.1", port=peer.port, timeout=timeout)


def _copies(tmp_path: Path, n: int) -> list[Path]:
    """n copies of RG1 under new SOP Instance UIDs."""
    ds = pydicom.dcmread(RG1)
    paths = []
    for i in range(n):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        paths.append(tmp_path / f"rg1-{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


def _requestor(peer: Peer, dimse_timeout: float = 10) -> Any:
    ae = RequestorAE(ae_title="PACSNODE")
    ae.acse_timeout = ae.network_timeout = 10
    ae.dimse_timeout = dimse_timeout
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", peer.port, ae_title="PEER")
    assert assoc.is_established
    return assoc


def _thread_cpu_seconds(native_id: int) -> float:
    """User + system CPU of one thread of this process (Linux /proc)."""
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_a_requested_association_runs_the_waking_reactor_and_sleeps_while_idle(peer: Peer) -> None:
    """Stock pynetdicom's requestor polls (its DUL every 0.1 ms as the node set it, its association
    thread every 1 ms): 22% of a core while an association waits. Ours waits in poll()."""
    assoc = _requestor(peer)
    try:
        assert isinstance(assoc, WakingAssociation) and isinstance(assoc.dul, WakingDUL)
        assert int(assoc.send_c_echo().Status) == 0
        threads = [assoc.native_id, assoc.dul.native_id]
        before = sum(_thread_cpu_seconds(t) for t in threads)
        threading.Event().wait(1.0)
        idle_cpu = sum(_thread_cpu_seconds(t) for t in threads) - before
        assert int(assoc.send_c_echo().Status) == 0  # and it still answers at once after the wait
    finally:
        assoc.release()
    wait_for(lambda: not assoc.is_alive() or None, 5, "the requestor's thread to end")
    assert idle_cpu < 0.05, f"an idle requestor used {idle_cpu:.3f} s of CPU in 1 s"
    wait_for(lambda: peer.released == 1 or None, 5, "the peer to record the release")


def test_a_requestor_still_gives_up_on_a_silent_peer(peer: Peer) -> None:
    """The DIMSE timeout still holds on our reactor: no answer -> empty status, association aborted."""
    peer.silent = True
    assoc = _requestor(peer, dimse_timeout=1)
    status = assoc.send_c_echo()
    assert "Status" not in status
    wait_for(lambda: assoc.is_aborted or None, 5, "the requestor's abort")
    assert not assoc.is_established


def test_a_peer_abort_ends_an_idle_requested_association(peer: Peer) -> None:
    """What the pool relies on: a kept association the peer drops is seen as no longer established."""
    assoc = _requestor(peer)
    [theirs] = wait_for(lambda: peer.open_associations() or None, 5, "the peer's side")
    theirs.abort()
    wait_for(lambda: not assoc.is_established or None, 5, "the requestor to see the abort")
    assert assoc.is_aborted


def test_sends_within_the_keep_time_share_one_association(peer: Peer, tmp_path: Path) -> None:
    dest = _destination(peer)
    first, second = _copies(tmp_path, 2)
    assert [o.ok for o in send_files(dest, [first], "PACSNODE", keep_open_seconds=30)] == [True]
    assert POOL.idle_count() == 1
    assert [o.ok for o in send_files(dest, [second], "PACSNODE", keep_open_seconds=30)] == [True]
    assert peer.associations == 1 and peer.released == 0
    assert peer.stored == [pydicom.dcmread(p).SOPInstanceUID for p in (first, second)]
    POOL.close_all()
    wait_for(lambda: peer.released == 1 or None, 5, "the release at close_all")
    assert POOL.idle_count() == 0


def test_an_idle_association_is_released_when_its_keep_time_ends(peer: Peer, tmp_path: Path) -> None:
    [path] = _copies(tmp_path, 1)
    assert send_files(_destination(peer), [path], "PACSNODE", keep_open_seconds=0.3)[0].ok
    assert POOL.idle_count() == 1
    wait_for(lambda: peer.released == 1 or None, 5, "the release after the keep time")
    assert POOL.idle_count() == 0 and peer.aborted == 0


def test_keep_zero_releases_after_each_send(peer: Peer, tmp_path: Path) -> None:
    dest = _destination(peer)
    for path in _copies(tmp_path, 2):
        assert send_files(dest, [path], "PACSNODE", keep_open_seconds=0)[0].ok
        assert POOL.idle_count() == 0
    wait_for(lambda: peer.released == 2 or None, 5, "two releases")
    assert peer.associations == 2


def test_a_kept_association_the_peer_dropped_is_not_lent_again(peer: Peer, tmp_path: Path) -> None:
    dest = _destination(peer)
    first, second = _copies(tmp_path, 2)
    assert send_files(dest, [first], "PACSNODE", keep_open_seconds=30)[0].ok
    [theirs] = peer.open_associations()
    theirs.abort()  # the PACS restarts, or its own idle timeout ends the association
    wait_for(lambda: peer.aborted == 1 or None, 5, "the peer's abort")
    assert send_files(dest, [second], "PACSNODE", keep_open_seconds=30)[0].ok
    assert peer.associations == 2
    assert str(pydicom.dcmread(second).SOPInstanceUID) in peer.stored


def test_a_batch_lost_on_a_kept_association_goes_again_on_a_new_one(peer: Peer, tmp_path: Path) -> None:
    """The peer drops the kept association as the next batch's first C-STORE arrives (no answer):
    the batch is sent on a new association, and every file of it arrives."""
    dest = _destination(peer)
    first, *batch = _copies(tmp_path, 3)
    assert send_files(dest, [first], "PACSNODE", keep_open_seconds=30)[0].ok
    peer.abort_on = {2}
    outcomes = send_files(dest, batch, "PACSNODE", keep_open_seconds=30)
    assert [o.ok for o in outcomes] == [True, True], [o.error for o in outcomes]
    assert peer.associations == 2
    assert peer.stored == [str(pydicom.dcmread(p).SOPInstanceUID) for p in (first, *batch)]


def test_a_failure_on_a_new_association_is_reported_not_retried(peer: Peer, tmp_path: Path) -> None:
    """Only a kept association that was lost is retried: a new one that fails is the answer."""
    [path] = _copies(tmp_path, 1)
    peer.abort_on = {1}
    [outcome] = send_files(_destination(peer), [path], "PACSNODE", keep_open_seconds=30)
    assert not outcome.ok and outcome.status is None
    assert peer.associations == 1 and peer.stored == []
    assert POOL.idle_count() == 0


def test_a_rejection_names_the_destinations_reason(peer: Peer, tmp_path: Path) -> None:
    """A PACS at its association limit rejects with a reason (PS3.8 9.3.4): the error gives it,
    so that an admin can tell congestion (retries get through) from a setting to change."""
    peer.server.ae.maximum_associations = 1
    held = _requestor(peer)
    try:
        with pytest.raises(DestinationUnavailable, match=r"failed: rejected \(Rejected Transient; .*Local limit exceeded\)"):
            send_files(_destination(peer), _copies(tmp_path, 1), "PACSNODE")
    finally:
        held.release()


def test_a_destination_taking_none_of_our_sop_classes_is_named(tmp_path: Path) -> None:
    """A PACS that accepts the association but none of its presentation contexts (pynetdicom then
    aborts it): the error says so and lists what was proposed, not a bare "aborted"."""
    ae = AE(ae_title="PEER")
    ae.add_supported_context(Verification)  # no storage at all
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False)
    dest = Destination(name="peer", ae_title="PEER", host="127.0.0.1", port=port, timeout=10)
    try:
        with pytest.raises(DestinationUnavailable,
                           match="accepted none of the proposed SOP classes .*Computed Radiography Image Storage"):
            send_files(dest, _copies(tmp_path, 1), "PACSNODE")
    finally:
        POOL.close_all()
        server.shutdown()
