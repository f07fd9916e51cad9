"""The spool: received instances and our results on disk, written atomically.

File names are hashes of UIDs, never the UIDs themselves: UIDs come from the wire and are
untrusted, so no path is ever built from one.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any


class SpoolError(OSError):
    """A path would leave the spool, or the spool cannot be written."""


def _h(value: str) -> str:
    return hashlib.sha256(value.encode("ascii", "replace")).hexdigest()


def instance_relpath(study_uid: str, sop_uid: str, sha256: str) -> str:
    """Relative path of a received instance; the content hash keeps re-sent versions apart."""
    s = _h(study_uid)
    return f"instances/{s[:2]}/{s[:24]}/{_h(sop_uid)[:32]}.{sha256[:12]}.dcm"


def output_relpath(job_id: int, kind: str, index: int) -> str:
    """Relative path of a result object written by a job."""
    if not kind.isalnum():
        raise SpoolError(f"output kind must be alphanumeric, not {kind!r}")
    return f"outputs/{job_id // 1000:04d}/{job_id}/{kind}-{index}.dcm"


@functools.lru_cache(maxsize=64)
def _real_root(root: Path) -> Path:
    """root with its links resolved, once per process (a system call per path component each time)."""
    return root.resolve()


def resolve(root: Path, relpath: str) -> Path:
    """Absolute path of relpath under root; refuse anything that would leave root."""
    base = _real_root(root)
    p = (base / relpath).resolve()
    if base != p and base not in p.parents:
        raise SpoolError(f"path {relpath!r} leaves the spool")
    return p


def held(root: Path, relpath: str) -> bool:
    """Whether the spool holds the file a row names (not once retention removed it, nor a path
    that would leave the spool)."""
    try:
        return resolve(root, relpath).is_file()
    except SpoolError:
        return False


def versions_of(root: Path, relpath: str) -> list[Path]:
    """Every file kept of the instance whose current file is relpath: it and the earlier
    versions of a re-sent instance (same study folder and SOP hash, other content hash)."""
    path = resolve(root, relpath)
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f"{path.name.split('.', 1)[0]}.*.dcm"))


def write_atomic(root: Path, relpath: str, data: bytes) -> Path:
    """Write data to root/relpath durably (staged, fsync'd, renamed, folders fsync'd)."""
    staged = StagedFile(root)
    try:
        staged.write(data)
        staged.finish()
        if staged.error is not None:
            raise SpoolError(f"{relpath}: {staged.error}")
        placement = staged.place(relpath)
    finally:
        staged.discard()
    try:
        placement.wait()
    except BaseException:
        placement.undo()
        raise
    return placement.path


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


#: Where received instances are written while they arrive, before they are placed under `instances/`.
INCOMING = "incoming"
_STAGED_SUFFIX = ".part"
# fsync of a file and of its folder issued together complete in one journal commit on ext4 and
# XFS (measured here: 1 ms together, 6 ms one after the other).
_fsync_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")

#: A large instance's written data is handed to the kernel's writeback every this many bytes
#: while it still arrives (sync_file_range, SYNC_FILE_RANGE_WRITE: starts the device writes,
#: waits for nothing), so the fsync after its last byte finds less left to write (7 MB in 128 KB
#: writes, measured here: fsync 16.9 -> 13.2 ms). A hint only: durability still comes from that fsync.
WRITEBACK_BYTES = 1 << 20
_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range  # Linux only
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_start_writeback = _sync_file_range()

#: A large instance is hashed beside its arrival: its data is handed to a hashing thread in
#: batches of this many bytes (hashlib releases the GIL), so the thread reading the socket does
#: not also spend ~10 ms per 7 MB in sha256; a small one is hashed at finish(), in one call.
HASH_BATCH_BYTES = 1 << 20
_hash_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sha256")


def _hash_batch(previous: Future[None] | None, digest: Any, chunks: list[bytes]) -> None:
    if previous is not None:
        previous.result()  # batches of one file in order (submitted earlier, so already running)
    for chunk in chunks:
        digest.update(chunk)


def sweep_incoming(root: Path, idle_seconds: float) -> int:
    """Remove staged files nobody has written to for `idle_seconds` (left by a process that was
    killed while receiving or writing); return how many."""
    folder = root / INCOMING
    cutoff = time.time() - idle_seconds
    removed = 0
    try:
        entries = list(os.scandir(folder))
    except OSError:  # no spool here (yet), or not ours to read: nothing to clean up, nothing to stop for
        return 0
    for entry in entries:
        try:
            if entry.name.endswith(_STAGED_SUFFIX) and entry.is_file(follow_symlinks=False) and \
                    entry.stat(follow_symlinks=False).st_mtime < cutoff:
                os.unlink(entry.path)
                removed += 1
        except OSError:  # placed or discarded meanwhile, or not ours to remove: left as it is
            continue
    return removed


class StagedFile:
    """An instance written into the spool's incoming folder as it arrives, hashed on the way.

    `finish()` says all of it is there and starts its fsync; `place()` moves it to its final
    name and makes that durable too; `discard()` removes it. Writes never raise: a failure (disk
    full, size limit) is kept in `error` and later writes are dropped, so the sender's data can
    still be read off the connection and refused with a status.
    """

    def __init__(self, root: Path, limit: int | None = None) -> None:
        self.root = root
        folder = root / INCOMING
        try:
            fd, name = tempfile.mkstemp(dir=folder, prefix=".", suffix=_STAGED_SUFFIX)
        except FileNotFoundError:  # made here the first time (and again if removed)
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(dir=folder, prefix=".", suffix=_STAGED_SUFFIX)
        self._fd: int | None = fd
        self._synced: Future[None] | None = None  # the file's fsync, once finished
        self.path: Path | None = Path(name)
        self.limit = limit
        self.size = 0
        self.error: str | None = None
        self.too_large = False  # the error is the size limit
        self._hash = hashlib.sha256()
        self._unhashed: list[bytes] = []  # written, not yet given to the hash
        self._unhashed_bytes = 0
        self._hashing: Future[None] | None = None  # the last batch handed to _hash_pool
        self._written_back = 0  # bytes handed to writeback so far (WRITEBACK_BYTES)
        # finish() runs in the listener's network thread once the data set is complete, but
        # pynetdicom has queued the message for the handler by then: the handler's place() (which
        # finishes too) may run at the same moment. Without this lock place() could see the
        # descriptor handed over but no fsync yet, and refuse the instance ("already placed"),
        # or both could fsync and close the same descriptor.
        self._finishing = threading.RLock()

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append data (from any thread, one writer at a time); failures are kept in `error`."""
        if self.error is not None or self._fd is None:
            return
        if self.limit is not None and self.size + len(data) > self.limit:
            self.too_large = True
            self.error = f"instance exceeds {self.limit} bytes"
            os.ftruncate(self._fd, 0)  # give the space back now; the rest is read and dropped
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
            self.size += len(data)
            # Kept until hashed: bytes (what the socket gives) cannot change meanwhile; anything else is copied.
            self._unhashed.append(data if isinstance(data, bytes) else bytes(data))
            self._unhashed_bytes += len(data)
            if self._unhashed_bytes >= HASH_BATCH_BYTES:
                self._hash_pending()
        except OSError as e:
            self.error = f"cannot write to the spool: {e}"
            return
        if _start_writeback is not None and self.size - self._written_back >= WRITEBACK_BYTES:
            # Failure is harmless (the fsync writes it all): the result is not looked at.
            _start_writeback(self._fd, self._written_back, self.size - self._written_back, _SYNC_FILE_RANGE_WRITE)
            self._written_back = self.size

    def _hash_pending(self) -> None:
        """Hand the data written since the last batch to the hash (in this thread if no batch runs)."""
        chunks, size = self._unhashed, self._unhashed_bytes
        self._unhashed, self._unhashed_bytes = [], 0
        if self._hashing is None and size < HASH_BATCH_BYTES:
            _hash_batch(None, self._hash, chunks)
        elif chunks:
            self._hashing = _hash_pool.submit(_hash_batch, self._hashing, self._hash, chunks)

    def finish(self) -> None:
        """All data is written: start the file's fsync now, so that it runs while the instance
        is checked and recorded (place() waits for it)."""
        with self._finishing:
            if self._unhashed:
                self._hash_pending()
            if self._fd is not None and self._synced is None and self.error is None:
                fd, self._fd = self._fd, None
                self._synced = _fsync_pool.submit(_fsync_close, fd)

    @property
    def sha256(self) -> str:
        """Hex digest of everything written (call after finish(), from any one thread)."""
        with self._finishing:  # the network thread's finish() may be handing over the last data
            if self._unhashed:
                self._hash_pending()
            hashing = self._hashing
        if hashing is not None:
            hashing.result()
        return self._hash.hexdigest()

    def place(self, relpath: str) -> Placement:
        """Move the file to root/relpath and start making it durable (file, folder and any new
        parent folders fsync'd); `Placement.wait()` returns once all of it is on disk."""
        with self._finishing:
            if self.path is None or (self._fd is None and self._synced is None):
                raise SpoolError("staged file was already placed or discarded")
            if self.error is not None:
                raise SpoolError(f"staged file is incomplete: {self.error}")
            self.finish()
            assert self._synced is not None  # finish() started it: no error, descriptor open
        target = resolve(self.root, relpath)
        created = _makedirs(target.parent)
        existed = target.exists()
        os.replace(self.path, target)
        self.path = None
        syncs = [self._synced]
        syncs += [_fsync_pool.submit(_fsync_path, folder) for folder in {target.parent, *(d.parent for d in created)}]
        return Placement(target, syncs, replaced=existed)

    def discard(self) -> None:
        """Remove the staged file (nothing happens once it was placed)."""
        with self._finishing:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)  # an fsync still running keeps its own descriptor
            self.path = None


class Placement:
    """A staged file at its final path, with its fsyncs under way."""

    def __init__(self, path: Path, syncs: list[Future[None]], replaced: bool) -> None:
        self.path = path
        self._syncs = syncs
        #: A file of the same name was there before (same UIDs and content, sent twice at once):
        #: it may belong to another sender's committed row, so undo() leaves it.
        self.replaced = replaced

    def wait(self) -> None:
        """Block until the file and its folders are durable; raise OSError if an fsync failed."""
        for s in self._syncs:
            s.result()

    def undo(self) -> None:
        """Remove the placed file after a failure (unless it may be another row's)."""
        for s in self._syncs:
            s.exception()  # wait: never unlink under a running fsync
        if not self.replaced:
            self.path.unlink(missing_ok=True)


def _makedirs(folder: Path) -> list[Path]:
    """mkdir -p that returns the folders it created (their parents must be fsync'd too)."""
    missing = []
    p = folder
    while not p.exists():
        missing.append(p)
        p = p.parent
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
            created.append(d)
        except FileExistsError:  # another association made it first
            pass
    return created


def _fsync_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_path(folder: Path) -> None:
    dfd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
