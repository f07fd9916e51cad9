"""The spool's staged files: hashed while written, size-limited, placed durably, never outside root."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from node.spool import INCOMING, SpoolError, StagedFile, write_atomic


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths fsync'd during the test, in order (read from /proc: Linux)."""
    paths: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    return paths


def test_staged_file_is_hashed_while_written_and_placed_under_its_name(tmp_path: Path) -> None:
    staged = StagedFile(tmp_path)
    chunks = [os.urandom(1 << 20) for _ in range(3)] + [b"tail"]
    for chunk in chunks:
        staged.write(chunk)
    data = b"".join(chunks)
    assert (staged.size, staged.sha256, staged.error) == (len(data), hashlib.sha256(data).hexdigest(), None)
    placement = staged.place("instances/ab/cd/x.dcm")
    placement.wait()
    staged.discard()  # after placing: nothing to discard
    assert placement.path == (tmp_path / "instances/ab/cd/x.dcm").resolve()
    assert placement.path.read_bytes() == data
    assert list((tmp_path / INCOMING).iterdir()) == []


def test_the_incoming_folder_is_made_again_if_removed_while_running(tmp_path: Path) -> None:
    """A staged file does not stat or make its folder each time; a folder an admin removed is
    made again by the next one, and placing under a spool root reached by a link still works."""
    root = tmp_path / "link"
    (tmp_path / "real").mkdir()
    root.symlink_to(tmp_path / "real")
    StagedFile(root).discard()
    (root / INCOMING).rmdir()
    staged = StagedFile(root)
    staged.write(b"data")
    placement = staged.place("instances/x.dcm")
    placement.wait()
    assert placement.path == tmp_path / "real" / "instances" / "x.dcm"
    assert placement.path.read_bytes() == b"data"
    with pytest.raises(SpoolError, match="leaves the spool"):
        StagedFile(root).place("../outside.dcm")


def test_size_limit_drops_the_data_and_says_why(tmp_path: Path) -> None:
    staged = StagedFile(tmp_path, limit=1000)
    staged.write(b"x" * 600)
    staged.write(b"x" * 600)
    staged.write(b"x" * 10)  # dropped: the error stands
    assert staged.error == "instance exceeds 1000 bytes"
    assert staged.path is not None and staged.path.stat().st_size == 0  # space given back at once
    staged.discard()
    assert list((tmp_path / INCOMING).iterdir()) == []


def test_write_failure_is_kept_not_raised(tmp_path: Path) -> None:
    staged = StagedFile(tmp_path)
    assert staged._fd is not None
    os.close(staged._fd)  # the descriptor goes bad under the writer
    staged.write(b"data")
    assert staged.error is not None and "cannot write to the spool" in staged.error
    staged._fd = None
    staged.discard()


def test_place_refuses_a_path_outside_the_root(tmp_path: Path) -> None:
    staged = StagedFile(tmp_path / "spool")
    staged.write(b"data")
    with pytest.raises(SpoolError, match=r"path '\.\./escape\.dcm' leaves the spool"):
        staged.place("../escape.dcm")
    staged.discard()
    assert not (tmp_path / "escape.dcm").exists()


def test_undo_keeps_a_file_that_was_there_before(tmp_path: Path) -> None:
    first = write_atomic(tmp_path, "instances/a/b.dcm", b"same")
    staged = StagedFile(tmp_path)
    staged.write(b"same")
    placement = staged.place("instances/a/b.dcm")
    assert placement.replaced
    placement.undo()
    assert first.read_bytes() == b"same"
    staged = StagedFile(tmp_path)
    staged.write(b"new")
    placement = staged.place("instances/c/d.dcm")
    assert not placement.replaced
    placement.undo()
    assert not placement.path.exists()


def test_place_twice_is_an_error(tmp_path: Path) -> None:
    staged = StagedFile(tmp_path)
    staged.write(b"x")
    staged.place("a.dcm").wait()
    with pytest.raises(SpoolError, match="already placed or discarded"):
        staged.place("b.dcm")


def test_write_atomic_fsyncs_the_file_and_every_folder_it_created(tmp_path: Path, synced: list[str]) -> None:
    (tmp_path / "outputs").mkdir()
    path = write_atomic(tmp_path, "outputs/0001/1001/sr-0.dcm", b"result")
    assert path.read_bytes() == b"result"
    root = tmp_path.resolve()
    folders = [str(root / "outputs/0001/1001"), str(root / "outputs/0001"), str(root / "outputs")]
    assert sorted(p for p in synced if p in folders) == sorted(folders)
    # The file itself, under its staged or its final name (its fsync may run before the rename).
    files = [p for p in synced if p not in folders]
    assert len(files) == 1 and (files[0] == str(path) or files[0].startswith(str(root / INCOMING)))


def test_finish_starts_the_fsync_and_place_waits_for_it(tmp_path: Path, synced: list[str]) -> None:
    staged = StagedFile(tmp_path)
    staged.write(b"data")
    staged.finish()
    staged.write(b"more")  # after finish: dropped, the file is complete
    assert staged.size == 4
    assert staged._synced is not None
    staged._synced.result(timeout=10)  # running on its own, before any place()
    placement = staged.place("a/b.dcm")
    placement.wait()
    assert placement.path.read_bytes() == b"data"
    # The file was fsync'd under its staged name (before the rename), then its new folders.
    assert synced[0].startswith(str((tmp_path / INCOMING).resolve()))
    assert sorted(synced[1:]) == sorted([str(tmp_path.resolve() / "a"), str(tmp_path.resolve())])


def test_a_file_that_failed_to_write_is_never_placed(tmp_path: Path) -> None:
    staged = StagedFile(tmp_path, limit=2)
    staged.write(b"data")
    staged.finish()
    with pytest.raises(SpoolError, match="staged file is incomplete: instance exceeds 2 bytes"):
        staged.place("a.dcm")
    staged.discard()
    assert not (tmp_path / "a.dcm").exists()


def test_a_large_staged_file_is_handed_to_writeback_as_it_arrives(tmp_path: Path, monkeypatch: Any) -> None:
    """Every WRITEBACK_BYTES the written range goes to sync_file_range; the bytes are unchanged."""
    import node.spool as spool_mod

    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(spool_mod, "_start_writeback", lambda fd, off, n, flags: calls.append((off, n)) or 0)
    staged = spool_mod.StagedFile(tmp_path)
    chunk = b"x" * (spool_mod.WRITEBACK_BYTES // 2 + 1)
    for _ in range(5):
        staged.write(chunk)
    staged.finish()
    placement = staged.place("instances/aa/bb/cc.dcm")
    placement.wait()
    assert placement.path.read_bytes() == chunk * 5
    assert calls == [(0, 2 * len(chunk)), (2 * len(chunk), 2 * len(chunk))]


def test_the_hash_of_a_large_file_is_computed_beside_its_writes(tmp_path: Path) -> None:
    """Batches hashed in another thread give the digest of all bytes in order; a bytearray the
    caller reuses after write() is copied first."""
    import node.spool as spool_mod

    staged = StagedFile(tmp_path)
    buffer = bytearray(spool_mod.HASH_BATCH_BYTES // 3 + 7)
    for i in range(10):
        buffer[:] = bytes([i]) * len(buffer)
        staged.write(buffer)
        staged.write(os.urandom(1000) if i % 2 else b"")
    staged.finish()
    with open(staged.path, "rb") as f:  # type: ignore[arg-type]
        assert hashlib.sha256(f.read()).hexdigest() == staged.sha256
    small = StagedFile(tmp_path)
    small.write(b"abc")
    small.finish()
    assert small.sha256 == hashlib.sha256(b"abc").hexdigest()


def test_place_while_the_network_thread_is_finishing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The listener's network thread calls finish() after pynetdicom has queued the message, so
    the handler's place() can run at the same moment: it waits for finish() instead of seeing the
    descriptor handed over but no fsync yet (found by bench/throughput.py: 0xA700 "already placed
    or discarded" with four concurrent senders)."""
    import threading
    import time

    from node import spool

    staged = spool.StagedFile(tmp_path)
    staged.write(b"x" * 100)
    submit = spool._fsync_pool.submit
    handing_over = threading.Event()

    def slow_submit(fn, *args):  # type: ignore[no-untyped-def]
        handing_over.set()
        time.sleep(0.2)  # the window between the descriptor handed over and its fsync started
        return submit(fn, *args)

    monkeypatch.setattr(spool._fsync_pool, "submit", slow_submit)
    network = threading.Thread(target=staged.finish)
    network.start()
    assert handing_over.wait(5)
    placement = staged.place("instances/a.dcm")
    placement.wait()
    network.join(5)
    assert (tmp_path / "instances" / "a.dcm").read_bytes() == b"x" * 100


def test_sweep_removes_only_staged_files_nobody_writes_to(tmp_path: Path) -> None:
    """A process killed while receiving leaves its staged file: the next listener start removes
    it once it is older than the idle time, and leaves anything newer or not a staged file."""
    from node.spool import sweep_incoming

    orphan, live = StagedFile(tmp_path), StagedFile(tmp_path)
    orphan.write(b"half a data set")
    other = tmp_path / INCOMING / "notes.txt"
    other.write_text("not ours to remove")
    assert orphan.path is not None and live.path is not None
    old = orphan.path.stat().st_mtime - 7200
    os.utime(orphan.path, (old, old))
    os.utime(other, (old, old))
    assert sweep_incoming(tmp_path, 3600) == 1
    assert sorted(p.name for p in (tmp_path / INCOMING).iterdir()) == sorted([live.path.name, "notes.txt"])
    assert sweep_incoming(tmp_path / "absent", 3600) == 0
    live.discard()
    orphan.discard()  # its file is gone already: nothing to do


def test_a_sweep_that_may_not_read_or_remove_stops_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spool the process may not list, or a file it may not remove: the process starts anyway."""
    from node.spool import sweep_incoming

    orphan = StagedFile(tmp_path)
    assert orphan.path is not None
    os.utime(orphan.path, (0, 0))

    def refused(*args: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("node.spool.os.unlink", refused)
    assert sweep_incoming(tmp_path, 3600) == 0
    assert orphan.path.exists()
    monkeypatch.setattr("node.spool.os.scandir", refused)
    assert sweep_incoming(tmp_path, 3600) == 0
    monkeypatch.undo()
    assert sweep_incoming(tmp_path, 3600) == 1
