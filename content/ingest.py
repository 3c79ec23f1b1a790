"""The ingest protocol: how a blob is written, resumed and committed.

An ingest is a directory ``ingest/<sha256(ref)>/`` holding

    ref        the client's ref string (echoed by Status, used by containerd's GC)
    data       the bytes received so far
    startedat  nanoseconds since the epoch, when the ingest began
    updatedat  nanoseconds, rewritten whenever a writer closes
    total      expected size, when the client announced one

so that a write resumes after a client reconnect and after a pysnap restart.

``Writer`` owns one open ingest (one writer per ref, enforced by ``RefLocks``);
its digest is computed while data arrives, and only a resumed ingest re-reads
the bytes already on disk.  ``WriteSession`` is the protocol state machine of
containerd's ``Write`` stream: it consumes ``WriteRequest``s and produces
``WriteResponse``s, with no gRPC or asyncio in sight.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from pysnap.errors import AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument, OutOfRange, Unavailable
from pysnap.validation import validate_labels

from .digests import digest_of, new_hasher, parse_digest
from .model import IngestStatus, WriteAction, WriteRequest, WriteResponse

if TYPE_CHECKING:
    from .store import ContentStore

READ_CHUNK = 1 << 20


def ingest_dir_name(ref: str) -> str:
    return hashlib.sha256(ref.encode()).hexdigest()


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_status(directory: Path) -> IngestStatus:
    """Status of an ingest as its directory records it (FileNotFoundError if gone)."""
    st = os.stat(directory / "data")
    ref = (directory / "ref").read_text()
    started = int((directory / "startedat").read_text())
    updated = max(int((directory / "updatedat").read_text()), st.st_mtime_ns)
    total_file = directory / "total"
    total = int(total_file.read_text()) if total_file.exists() else 0
    return IngestStatus(ref=ref, offset=st.st_size, total=total, started_ns=started, updated_ns=updated)


class RefLocks:
    """One writer per ref, within this process."""

    def __init__(self, clock: Callable[[], int] = time.time_ns) -> None:
        self._held: dict[str, int] = {}
        self._mutex = threading.Lock()
        self._clock = clock

    def acquire(self, ref: str) -> None:
        with self._mutex:
            since = self._held.get(ref)
            if since is None:
                self._held[ref] = self._clock()
                return
        held_for = (self._clock() - since) / 1e9
        raise Unavailable(f"ref {ref} locked for {held_for:.3f}s (since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(since / 1e9))})")

    def release(self, ref: str) -> None:
        with self._mutex:
            self._held.pop(ref, None)


class Writer:
    """An open ingest. Not thread-safe: one stream drives it."""

    def __init__(self, store: "ContentStore", ref: str, total: int, clock: Callable[[], int]) -> None:
        self.store = store
        self.ref = ref
        self.directory = store.ingest_root / ingest_dir_name(ref)
        self._clock = clock
        self.hasher = new_hasher()
        self.closed = False
        status = self._resume(total) if (self.directory / "data").exists() else None
        if status is None:
            self._initialise(total)
        self._fd = os.open(self.directory / "data", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        os.lseek(self._fd, self.offset, os.SEEK_SET)

    def _initialise(self, total: int) -> None:
        now = self._clock()
        shutil.rmtree(self.directory, ignore_errors=True)
        self.directory.mkdir(mode=0o755, parents=True)
        os.chmod(self.directory, 0o755)  # whatever the umask
        (self.directory / "ref").write_text(self.ref)
        (self.directory / "data").touch()
        write_atomically(self.directory / "startedat", str(now))
        write_atomically(self.directory / "updatedat", str(now))
        if total > 0:
            write_atomically(self.directory / "total", str(total))
        self.offset, self.total, self.started_ns, self.updated_ns = 0, total, now, now

    def _resume(self, total: int) -> IngestStatus | None:
        try:
            status = read_status(self.directory)
        except (OSError, ValueError):
            return None
        if status.ref != self.ref or (total > 0 and status.total > 0 and total != status.total):
            return None
        with open(self.directory / "data", "rb") as data:
            while chunk := data.read(READ_CHUNK):
                self.hasher.update(chunk)
        self.offset, self.total = status.offset, status.total or total
        self.started_ns, self.updated_ns = status.started_ns, status.updated_ns
        if total > 0 and status.total == 0:
            write_atomically(self.directory / "total", str(total))
        return status

    @property
    def digest(self) -> str:
        return digest_of(self.hasher)

    def status(self) -> IngestStatus:
        return IngestStatus(self.ref, self.offset, self.total, self.started_ns, self.updated_ns)

    def write(self, data: bytes, at: int) -> None:
        """Append ``data``; ``at`` is the client's offset (0 restarts the ingest)."""
        if at > 0 and at != self.offset:
            raise OutOfRange(f"write @{at} must occur at current offset {self.offset}")
        if at == 0 and self.offset > 0:
            os.ftruncate(self._fd, 0)
            os.lseek(self._fd, 0, os.SEEK_SET)
            self.offset = 0
            self.hasher = new_hasher()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            if written <= 0:
                raise DataLoss(f"short write to ingest {self.ref}")
            view = view[written:]
        self.hasher.update(data)
        self.offset += len(data)
        self.updated_ns = self._clock()

    def commit(self, size: int, expected: str, labels: dict[str, str]) -> str:
        """Verify and publish the blob; returns its digest.

        Size or digest mismatch, or invalid labels, leave the ingest in place
        (the client may fix it and retry); an existing blob discards it
        (AlreadyExists)."""
        if self.closed:
            raise FailedPrecondition(f"cannot commit ingest {self.ref}: writer is closed")
        validate_labels(labels)
        if not (self.directory / "data").exists():
            raise FailedPrecondition(f"ingest {self.ref} was aborted while being written")
        os.fsync(self._fd)
        actual_size = os.fstat(self._fd).st_size
        if size > 0 and size != actual_size:
            raise FailedPrecondition(f"unexpected commit size {actual_size}, expected {size}")
        digest = self.digest
        if expected and expected != digest:
            raise FailedPrecondition(f"unexpected commit digest {digest}, expected {expected}")
        try:
            self.store.publish(self.directory / "data", digest, actual_size, labels)
        finally:
            self._discard()
        return digest

    def _discard(self) -> None:
        # Remove the ingest before releasing the ref: a writer waiting for the
        # ref must not see the ingest it creates deleted under it.
        shutil.rmtree(self.directory, ignore_errors=True)
        self.close(record=False)

    def close(self, record: bool = True) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if record:
                os.fsync(self._fd)
                write_atomically(self.directory / "updatedat", str(self.updated_ns))
        except FileNotFoundError:
            pass  # aborted meanwhile
        finally:
            os.close(self._fd)
            self.store.locks.release(self.ref)


class WriteSession:
    """containerd's Write stream, one request at a time.

    Every request is answered with its own action and the writer's offset.
    ``expected`` and a non-zero ``total`` are remembered across requests; STAT
    reports the digest so far; WRITE and COMMIT append at the client's offset;
    COMMIT then verifies and publishes, ending the session.

    ``handle`` and ``close`` may be called from different threads (a cancelled
    RPC closes the session while its last request may still be handled); they
    never overlap.
    """

    def __init__(self, store: "ContentStore", first: WriteRequest) -> None:
        if not first.ref:
            raise InvalidArgument("first message must have a reference")
        self.store = store
        self.writer = store.open_writer(first.ref, first.total, first.expected)
        self.total = first.total
        self.expected = ""
        self.done = False
        self._started_ns = 0
        self._updated_ns = 0
        self._busy = threading.Lock()

    def handle(self, request: WriteRequest) -> WriteResponse:
        with self._busy:
            return self._handle(request)

    def _handle(self, request: WriteRequest) -> WriteResponse:
        if self.done:
            raise FailedPrecondition(f"ingest {self.writer.ref} already committed")
        writer = self.writer
        if request.expected:
            parse_digest(request.expected)
            self.expected = request.expected
            if self.store.exists(request.expected):
                self.store.abort(writer.ref)  # before releasing the ref, as in Writer._discard
                writer.close(record=False)
                self.done = True
                raise AlreadyExists(f"blob with expected digest {request.expected} exists")
        if request.total > 0:
            self.total = request.total
        digest = ""
        if request.action is WriteAction.STAT:
            digest = writer.digest
            self._started_ns, self._updated_ns = writer.started_ns, writer.updated_ns
            return WriteResponse(request.action, writer.offset, self.total, digest, self._started_ns, self._updated_ns)
        if request.action not in (WriteAction.WRITE, WriteAction.COMMIT):
            raise InvalidArgument(f"unknown write action {int(request.action)}")
        writer.write(request.data, request.offset)
        if request.action is WriteAction.COMMIT:
            digest = writer.commit(self.total, self.expected, request.labels)
            self.done = True
        return WriteResponse(request.action, writer.offset, self.total, digest, self._started_ns, self._updated_ns)

    def close(self) -> None:
        with self._busy:
            self.writer.close()
