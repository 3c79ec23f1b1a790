"""The content store's domain core, without gRPC.

``ContentStore`` is exercised on a temporary root and ``WriteSession`` is driven
with ``WriteRequest`` objects exactly as the servicer drives it: the first
request opens the session and is then handled like every other one.

Reference: containerd's built-in local content store (semantics.md B1-B7, D2),
with pysnap's deliberate differences: labels are stored (the labeled store),
refs with a ``..`` segment or a NUL are InvalidArgument, a resume whose ref or
total mismatches starts over with empty data, and List is ordered by digest.
"""
from __future__ import annotations

import hashlib
import os
import stat
import threading
import time
from pathlib import Path

import pytest

from content.ingest import WriteSession, ingest_dir_name
from content.model import WriteAction, WriteRequest
from content.store import ContentStore
from pysnap.config import ContentConfig
from pysnap.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, OutOfRange, Unavailable

STAT, WRITE, COMMIT = WriteAction.STAT, WriteAction.WRITE, WriteAction.COMMIT
EMPTY_DIGEST = "sha256:" + hashlib.sha256(b"").hexdigest()


# --------------------------------------------------------------------------- helpers


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def make_store(root: Path) -> ContentStore:
    return ContentStore(ContentConfig(root=root, durable_metadata=False))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "content"


@pytest.fixture
def store(root: Path):
    s = make_store(root)
    yield s
    s.close()


def open_session(store: ContentStore, ref: str = "ref", **first) -> tuple[WriteSession, object]:
    """Open a Write stream the way the servicer does: construct, then handle the first message."""
    request = WriteRequest(ref=ref, **first)
    session = WriteSession(store, request)
    return session, session.handle(request)


def write_blob(store: ContentStore, data: bytes, ref: str | None = None,
               labels: dict[str, str] | None = None) -> str:
    """Write and commit ``data`` in one stream; returns its digest."""
    session, _ = open_session(store, ref or f"write-{sha256(data)}", total=len(data))
    try:
        response = session.handle(WriteRequest(COMMIT, data=data, labels=labels or {}))
    finally:
        session.close()
    return response.digest


def ingest_dir(store: ContentStore, ref: str) -> Path:
    return store.ingest_root / ingest_dir_name(ref)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --------------------------------------------------------------------------- opening a write stream


def test_first_message_without_a_ref_is_invalid_argument(store):
    with pytest.raises(InvalidArgument, match="first message must have a reference"):
        WriteSession(store, WriteRequest(STAT))


def test_a_request_without_an_action_is_a_stat():
    assert WriteRequest().action is STAT


def test_write_actions_are_numbered_as_on_the_wire():
    assert (int(STAT), int(WRITE), int(COMMIT)) == (0, 1, 2)


def test_stat_on_a_new_ingest_reports_offset_zero_and_the_digest_of_nothing(store):
    before = time.time_ns()
    session, response = open_session(store, "r", total=256)
    after = time.time_ns()
    assert response.action is STAT
    assert response.offset == 0
    assert response.total == 256
    assert response.digest == EMPTY_DIGEST
    assert before <= response.started_ns <= after
    assert response.updated_ns == response.started_ns
    session.close()


def test_stat_ignores_the_data_it_carries(store):
    session, _ = open_session(store, "r")
    response = session.handle(WriteRequest(STAT, data=b"ignored"))
    assert response.offset == 0
    assert response.digest == EMPTY_DIGEST
    assert (ingest_dir(store, "r") / "data").read_bytes() == b""
    session.close()


def test_every_response_echoes_its_action_and_the_current_offset(store):
    session, first = open_session(store, "r")
    assert (first.action, first.offset) == (STAT, 0)
    written = session.handle(WriteRequest(WRITE, offset=0, data=b"abc"))
    assert (written.action, written.offset) == (WRITE, 3)
    stat_ = session.handle(WriteRequest(STAT))
    assert (stat_.action, stat_.offset) == (STAT, 3)
    committed = session.handle(WriteRequest(COMMIT, offset=3, data=b"de"))
    assert (committed.action, committed.offset) == (COMMIT, 5)
    session.close()


# --------------------------------------------------------------------------- writing


def test_write_appends_at_the_current_offset(store):
    session, _ = open_session(store, "r")
    session.handle(WriteRequest(WRITE, offset=0, data=b"hello "))
    response = session.handle(WriteRequest(WRITE, offset=6, data=b"world"))
    assert response.offset == 11
    assert (ingest_dir(store, "r") / "data").read_bytes() == b"hello world"
    session.close()


def test_write_at_offset_zero_restarts_the_ingest(store):
    session, _ = open_session(store, "r")
    session.handle(WriteRequest(WRITE, offset=0, data=b"first attempt"))
    response = session.handle(WriteRequest(WRITE, offset=0, data=b"again"))
    assert response.offset == 5
    assert session.handle(WriteRequest(STAT)).digest == sha256(b"again")
    assert (ingest_dir(store, "r") / "data").read_bytes() == b"again"
    session.close()


def test_write_at_another_offset_is_out_of_range_and_changes_nothing(store):
    session, _ = open_session(store, "r")
    session.handle(WriteRequest(WRITE, offset=0, data=b"abc"))
    with pytest.raises(OutOfRange, match="write @7 must occur at current offset 3"):
        session.handle(WriteRequest(WRITE, offset=7, data=b"xyz"))
    with pytest.raises(OutOfRange, match="write @1 must occur at current offset 3"):
        session.handle(WriteRequest(COMMIT, offset=1, data=b"xyz"))
    response = session.handle(WriteRequest(STAT))
    assert (response.offset, response.digest) == (3, sha256(b"abc"))
    session.close()


def test_digest_so_far_equals_hashlib_over_the_data_written(store):
    pieces = [os.urandom(n) for n in (1, 31, 4096, 65_537, 0, 7)]
    session, _ = open_session(store, "r")
    reference = hashlib.sha256()
    offset = 0
    for piece in pieces:
        session.handle(WriteRequest(WRITE, offset=offset, data=piece))
        offset += len(piece)
        reference.update(piece)
        assert session.handle(WriteRequest(STAT)).digest == "sha256:" + reference.hexdigest()
    committed = session.handle(WriteRequest(COMMIT, offset=offset))
    assert committed.digest == sha256(b"".join(pieces))


def test_write_and_commit_responses_repeat_the_timestamps_of_the_last_stat(store):
    session, stat_ = open_session(store, "r")
    time.sleep(0.002)
    written = session.handle(WriteRequest(WRITE, offset=0, data=b"abc"))
    assert (written.started_ns, written.updated_ns) == (stat_.started_ns, stat_.updated_ns)
    restat = session.handle(WriteRequest(STAT))
    assert restat.updated_ns > stat_.updated_ns
    committed = session.handle(WriteRequest(COMMIT, offset=3))
    assert (committed.started_ns, committed.updated_ns) == (restat.started_ns, restat.updated_ns)


# --------------------------------------------------------------------------- committing


def test_commit_publishes_the_blob_and_removes_the_ingest(store):
    data = b"some content"
    session, _ = open_session(store, "r")
    response = session.handle(WriteRequest(COMMIT, offset=0, data=data))
    session.close()
    assert response.digest == sha256(data)
    assert response.offset == len(data)
    assert store.blob_path(sha256(data)).read_bytes() == data
    assert store.info(sha256(data)).size == len(data)
    assert not ingest_dir(store, "r").exists()
    with pytest.raises(NotFound):
        store.status("r")


def test_commit_after_writes_needs_no_data_of_its_own(store):
    session, _ = open_session(store, "r")
    session.handle(WriteRequest(WRITE, offset=0, data=b"abc"))
    response = session.handle(WriteRequest(COMMIT, offset=3))
    assert response.digest == sha256(b"abc")
    assert store.info(sha256(b"abc")).size == 3


def test_commit_at_offset_zero_after_writes_restarts_with_its_own_data(store):
    session, _ = open_session(store, "r")
    session.handle(WriteRequest(WRITE, offset=0, data=b"discarded"))
    response = session.handle(WriteRequest(COMMIT, offset=0, data=b"kept"))
    assert response.digest == sha256(b"kept")


def test_total_from_the_first_message_is_checked_at_commit(store):
    session, _ = open_session(store, "r", total=10)
    session.handle(WriteRequest(WRITE, offset=0, data=b"12345"))
    with pytest.raises(FailedPrecondition, match="unexpected commit size 5, expected 10"):
        session.handle(WriteRequest(COMMIT, offset=5))
    session.close()


def test_the_latest_nonzero_total_wins(store):
    session, _ = open_session(store, "r", total=10)
    assert session.handle(WriteRequest(STAT, total=5)).total == 5
    assert session.handle(WriteRequest(STAT, total=0)).total == 5
    response = session.handle(WriteRequest(COMMIT, offset=0, data=b"12345"))
    assert response.digest == sha256(b"12345")


def test_commit_without_a_total_accepts_any_size(store):
    session, _ = open_session(store, "r")
    assert session.handle(WriteRequest(COMMIT, offset=0, data=b"x" * 1234)).offset == 1234


def test_expected_from_an_earlier_message_is_checked_at_commit(store):
    session, _ = open_session(store, "r", expected=sha256(b"something else"))
    with pytest.raises(FailedPrecondition,
                       match=f"unexpected commit digest {sha256(b'abc')}, expected {sha256(b'something else')}"):
        session.handle(WriteRequest(COMMIT, offset=0, data=b"abc"))
    session.close()


def test_expected_given_at_commit_is_checked(store):
    session, _ = open_session(store, "r")
    session.handle(WriteRequest(WRITE, offset=0, data=b"abc"))
    with pytest.raises(FailedPrecondition, match="unexpected commit digest"):
        session.handle(WriteRequest(COMMIT, offset=3, expected=sha256(b"abd")))
    session.close()


def test_commit_with_wrong_size_keeps_the_ingest_for_a_retry(store):
    session, _ = open_session(store, "r")
    session.handle(WriteRequest(WRITE, offset=0, data=b"abc"))
    with pytest.raises(FailedPrecondition):
        session.handle(WriteRequest(COMMIT, offset=3, total=4))
    session.close()
    assert store.status("r").offset == 3
    retry, response = open_session(store, "r")
    assert (response.offset, response.digest) == (3, sha256(b"abc"))
    assert retry.handle(WriteRequest(COMMIT, offset=3, total=3)).digest == sha256(b"abc")


def test_commit_with_wrong_digest_keeps_the_ingest_for_a_retry(store):
    session, _ = open_session(store, "r")
    session.handle(WriteRequest(WRITE, offset=0, data=b"abc"))
    with pytest.raises(FailedPrecondition):
        session.handle(WriteRequest(COMMIT, offset=3, expected=sha256(b"xyz")))
    session.close()
    assert (ingest_dir(store, "r") / "data").read_bytes() == b"abc"
    assert not store.exists(sha256(b"abc"))
    retry, response = open_session(store, "r")
    assert response.offset == 3
    assert retry.handle(WriteRequest(COMMIT, offset=3, expected=sha256(b"abc"))).digest == sha256(b"abc")


def test_commit_of_an_existing_blob_is_already_exists_and_removes_the_ingest(store):
    write_blob(store, b"abc", ref="first")
    session, _ = open_session(store, "second")
    session.handle(WriteRequest(WRITE, offset=0, data=b"abc"))
    with pytest.raises(AlreadyExists, match=f"content {sha256(b'abc')}: already exists"):
        session.handle(WriteRequest(COMMIT, offset=3))
    session.close()
    assert not ingest_dir(store, "second").exists()
    with pytest.raises(NotFound):
        store.status("second")
    assert store.blob_path(sha256(b"abc")).read_bytes() == b"abc"


def test_messages_after_a_commit_are_failed_precondition(store):
    session, _ = open_session(store, "r")
    session.handle(WriteRequest(COMMIT, offset=0, data=b"abc"))
    with pytest.raises(FailedPrecondition):
        session.handle(WriteRequest(STAT))


def test_commit_with_labels_stores_them_and_drops_empty_values(store):
    data = b"labelled"
    write_blob(store, data, labels={"containerd.io/gc.root": "now", "k": "v", "empty": ""})
    assert store.info(sha256(data)).labels == {"containerd.io/gc.root": "now", "k": "v"}


def test_commit_without_labels_stores_none(store):
    assert store.info(write_blob(store, b"plain")).labels == {}


def test_commit_with_an_oversized_label_is_invalid_argument_and_keeps_the_ingest(store):
    session, _ = open_session(store, "r")
    session.handle(WriteRequest(WRITE, offset=0, data=b"abc"))
    with pytest.raises(InvalidArgument, match="label key and value greater than maximum size"):
        session.handle(WriteRequest(COMMIT, offset=3, labels={"k": "v" * 4096}))
    session.close()
    assert not store.exists(sha256(b"abc"))
    assert store.status("r").offset == 3


# --------------------------------------------------------------------------- expected digest already present


def test_opening_with_an_expected_digest_already_present_is_already_exists(store):
    digest = write_blob(store, b"abc")
    with pytest.raises(AlreadyExists, match=f"content {digest}: already exists"):
        open_session(store, "r", expected=digest)
    assert not ingest_dir(store, "r").exists()


def test_an_expected_digest_already_present_mid_stream_aborts_the_ingest(store):
    session, _ = open_session(store, "r")
    session.handle(WriteRequest(WRITE, offset=0, data=b"ab"))
    digest = write_blob(store, b"abc", ref="other")
    with pytest.raises(AlreadyExists, match=f"blob with expected digest {digest} exists"):
        session.handle(WriteRequest(WRITE, offset=2, data=b"c", expected=digest))
    assert not ingest_dir(store, "r").exists()
    with pytest.raises(FailedPrecondition):
        session.handle(WriteRequest(STAT))
    session.close()


def test_an_invalid_expected_digest_is_invalid_argument(store):
    with pytest.raises(InvalidArgument, match="failed validation"):
        open_session(store, "r", expected="sha256:nothex")
    session, _ = open_session(store, "r")
    with pytest.raises(InvalidArgument, match="failed validation"):
        session.handle(WriteRequest(STAT, expected="md5:0123"))
    session.close()


# --------------------------------------------------------------------------- on-disk layout


def test_a_blob_is_stored_read_only_at_blobs_algorithm_hex(store, root):
    digest = write_blob(store, b"abc")
    path = root / "blobs" / "sha256" / hashlib.sha256(b"abc").hexdigest()
    assert store.blob_path(digest) == path
    assert path.read_bytes() == b"abc"
    assert mode(path) == 0o444


def test_store_directories_are_0755(store, root):
    write_blob(store, b"abc")
    session, _ = open_session(store, "r")
    for directory in (root, root / "blobs", root / "blobs" / "sha256", root / "ingest", ingest_dir(store, "r")):
        assert mode(directory) == 0o755, directory
    session.close()


def test_store_directory_modes_do_not_depend_on_the_umask(root):
    old = os.umask(0o077)
    try:
        store = make_store(root)
        write_blob(store, b"abc")
        session, _ = open_session(store, "r")
        session.close()
        store.close()
    finally:
        os.umask(old)
    for directory in (root, root / "blobs", root / "blobs" / "sha256", root / "ingest", ingest_dir(store, "r")):
        assert mode(directory) == 0o755, directory
    assert mode(store.blob_path(sha256(b"abc"))) == 0o444


def test_an_ingest_directory_records_ref_times_total_and_data(store):
    session, response = open_session(store, "default/1/layer-sha256:abc", total=3)
    session.handle(WriteRequest(WRITE, offset=0, data=b"ab"))
    session.close()
    directory = store.ingest_root / hashlib.sha256(b"default/1/layer-sha256:abc").hexdigest()
    assert (directory / "ref").read_text() == "default/1/layer-sha256:abc"
    assert (directory / "data").read_bytes() == b"ab"
    assert (directory / "total").read_text() == "3"
    assert int((directory / "startedat").read_text()) == response.started_ns
    assert int((directory / "updatedat").read_text()) >= response.started_ns


def test_an_ingest_without_a_total_has_no_total_file(store):
    session, _ = open_session(store, "r")
    session.close()
    assert not (ingest_dir(store, "r") / "total").exists()
    assert store.status("r").total == 0


# --------------------------------------------------------------------------- Info and Update


def test_info_reports_size_times_and_labels_of_a_committed_blob(store):
    before = time.time_ns()
    digest = write_blob(store, b"abcdef", labels={"k": "v"})
    after = time.time_ns()
    info = store.info(digest)
    assert (info.digest, info.size, info.labels) == (digest, 6, {"k": "v"})
    assert before <= info.created_ns <= after
    assert info.updated_ns == info.created_ns


def test_info_of_a_missing_blob_is_not_found(store):
    digest = sha256(b"missing")
    with pytest.raises(NotFound, match=f"content {digest}: not found"):
        store.info(digest)
    assert not store.exists(digest)


def test_update_without_a_mask_replaces_all_labels(store):
    digest = write_blob(store, b"abc", labels={"k1": "v1", "k2": "v2"})
    created = store.info(digest).created_ns
    before = time.time_ns()
    info = store.update(digest, {"k1": "new", "k3": "v3"}, [])
    after = time.time_ns()
    assert info.labels == {"k1": "new", "k3": "v3"}
    assert store.info(digest).labels == {"k1": "new", "k3": "v3"}
    assert before <= info.updated_ns <= after
    assert info.created_ns == created


def test_update_with_the_labels_mask_replaces_all_labels(store):
    digest = write_blob(store, b"abc", labels={"k1": "v1", "k2": "v2"})
    assert store.update(digest, {"k3": "v3", "empty": ""}, ["labels"]).labels == {"k3": "v3"}


def test_update_with_label_key_paths_changes_only_those_keys(store):
    digest = write_blob(store, b"abc", labels={"k1": "v1", "k2": "v2", "k3": "v3"})
    info = store.update(digest, {"k1": "reset", "k3": "", "k2": "ignored", "k4": "added"},
                        ["labels.k1", "labels.k3", "labels.k4"])
    assert info.labels == {"k1": "reset", "k2": "v2", "k4": "added"}


def test_update_with_a_label_key_path_absent_from_the_labels_deletes_that_key(store):
    digest = write_blob(store, b"abc", labels={"k1": "v1", "k2": "v2"})
    assert store.update(digest, {}, ["labels.k1"]).labels == {"k2": "v2"}


def test_update_of_another_field_is_invalid_argument(store):
    digest = write_blob(store, b"abc", labels={"k": "v"})
    with pytest.raises(InvalidArgument, match='cannot update "size" field on content info'):
        store.update(digest, {"k": "w"}, ["labels.k", "size"])
    assert store.info(digest).labels == {"k": "v"}


def test_update_of_a_missing_blob_is_not_found(store):
    with pytest.raises(NotFound):
        store.update(sha256(b"missing"), {"k": "v"}, [])


def test_update_with_an_oversized_label_is_invalid_argument(store):
    digest = write_blob(store, b"abc")
    with pytest.raises(InvalidArgument, match="greater than maximum size"):
        store.update(digest, {"k" * 4000: "v" * 100}, [])


# --------------------------------------------------------------------------- List


def test_list_returns_every_blob_ordered_by_digest(store):
    digests = [write_blob(store, f"blob {i}".encode()) for i in range(20)]
    listed = store.list()
    assert [i.digest for i in listed] == sorted(digests)
    assert all(i.size == len(store.blob_path(i.digest).read_bytes()) for i in listed)


def test_list_of_an_empty_store_is_empty(store):
    assert store.list() == []


def test_list_filters_by_digest(store):
    a, _ = write_blob(store, b"a"), write_blob(store, b"b")
    assert [i.digest for i in store.list([f"digest=={a}"])] == [a]
    assert a not in [i.digest for i in store.list([f"digest!={a}"])]


def test_list_filters_by_labels(store):
    root = write_blob(store, b"root", labels={"containerd.io/gc.root": "x", "l": "1"})
    other = write_blob(store, b"other", labels={"l": "2"})
    write_blob(store, b"unlabelled")
    assert [i.digest for i in store.list(['labels."containerd.io/gc.root"'])] == [root]
    assert [i.digest for i in store.list(["labels.l==2"])] == [other]
    assert {i.digest for i in store.list(["labels.l"])} == {root, other}
    assert {i.digest for i in store.list(["labels.l~=^[12]$"])} == {root, other}


def test_list_filter_strings_are_ored_and_their_selectors_anded(store):
    a = write_blob(store, b"a", labels={"x": "1", "y": "1"})
    b = write_blob(store, b"b", labels={"x": "1"})
    c = write_blob(store, b"c", labels={"z": "1"})
    assert [i.digest for i in store.list(["labels.x,labels.y"])] == [a]
    assert {i.digest for i in store.list(["labels.y", "labels.z"])} == {a, c}
    assert b not in {i.digest for i in store.list(["labels.y", "labels.z"])}


def test_list_with_a_malformed_filter_is_invalid_argument(store):
    with pytest.raises(InvalidArgument):
        store.list(["labels.x=="])
    with pytest.raises(InvalidArgument):
        store.list(["digest<>x"])


# --------------------------------------------------------------------------- Delete


def test_delete_removes_the_blob_and_its_metadata(store):
    digest = write_blob(store, b"abc", labels={"k": "v"})
    store.delete(digest)
    assert not store.blob_path(digest).exists()
    assert not store.exists(digest)
    assert store.list() == []


def test_delete_of_a_missing_blob_succeeds(store):
    store.delete(sha256(b"never written"))


def test_delete_of_an_invalid_digest_is_invalid_argument(store):
    with pytest.raises(InvalidArgument):
        store.delete("sha256:../../metadata.db")


def test_a_deleted_blob_written_again_has_only_its_new_labels(store):
    digest = write_blob(store, b"abc", labels={"old": "1"})
    store.delete(digest)
    write_blob(store, b"abc", labels={"new": "1"})
    assert store.info(digest).labels == {"new": "1"}


# --------------------------------------------------------------------------- Read ranges


@pytest.fixture
def ten(store) -> str:
    return write_blob(store, b"0123456789")


def test_read_range_of_the_whole_blob(store, ten):
    assert store.read_range(ten, 0, 0) == (0, 10)


def test_read_range_with_a_negative_offset_starts_at_zero(store, ten):
    assert store.read_range(ten, -5, 3) == (0, 3)


def test_read_range_past_the_end_is_out_of_range(store, ten):
    with pytest.raises(OutOfRange, match="read past object length 10 bytes"):
        store.read_range(ten, 11, 0)


def test_read_range_at_the_end_is_empty(store, ten):
    assert store.read_range(ten, 10, 0) == (10, 10)


@pytest.mark.parametrize("size", [0, -1])
def test_read_range_with_no_positive_size_reads_to_the_end(store, ten, size):
    assert store.read_range(ten, 4, size) == (4, 10)


def test_read_range_is_clamped_to_the_end(store, ten):
    assert store.read_range(ten, 4, 100) == (4, 10)
    assert store.read_range(ten, 4, 3) == (4, 7)


def test_read_range_of_a_missing_blob_is_not_found(store):
    with pytest.raises(NotFound):
        store.read_range(sha256(b"missing"), 0, 0)


def test_a_reader_returns_its_range_in_chunks_and_then_nothing(store, ten):
    reader = store.open_reader(ten, 2, 5)
    try:
        assert reader.next_chunk() == b"23456"
        assert reader.next_chunk() == b""
    finally:
        reader.close()


def test_a_large_range_comes_in_chunks_of_at_most_one_mebibyte(store):
    data = bytes(range(256)) * (5 * 4096)  # 5 MiB
    digest = write_blob(store, data)
    reader = store.open_reader(digest, 0, 0)
    try:
        chunks = iter(reader.next_chunk, b"")
        got = list(chunks)
    finally:
        reader.close()
    assert b"".join(got) == data
    assert max(len(c) for c in got) <= 1 << 20


def test_opening_a_reader_on_a_missing_blob_is_not_found(store):
    with pytest.raises(NotFound):
        store.open_reader(sha256(b"missing"), 0, 0)


def test_status_reports_ref_offset_total_and_times(store):
    session, opened = open_session(store, "r", total=100)
    session.handle(WriteRequest(WRITE, offset=0, data=b"x" * 40))
    status = store.status("r")
    assert (status.ref, status.offset, status.total, status.expected) == ("r", 40, 100, "")
    assert status.started_ns == opened.started_ns
    assert status.updated_ns >= opened.updated_ns
    session.close()


def test_status_needs_no_lock_while_a_writer_is_open(store):
    session, _ = open_session(store, "r")
    assert store.status("r").offset == 0
    session.close()


def test_status_of_an_unknown_ref_is_not_found(store):
    with pytest.raises(NotFound, match='could not get status for ref "nope"'):
        store.status("nope")


def test_list_statuses_returns_every_ingest(store):
    for ref in ("a", "b", "c"):
        session, _ = open_session(store, ref)
        session.close()
    assert sorted(s.ref for s in store.list_statuses()) == ["a", "b", "c"]


def test_list_statuses_filters_by_ref(store):
    for ref in ("default/1/layer-sha256:aa", "default/1/config-sha256:bb", "other"):
        session, _ = open_session(store, ref)
        session.close()
    assert [s.ref for s in store.list_statuses(["ref==other"])] == ["other"]
    assert [s.ref for s in store.list_statuses(["ref~=layer-"])] == ["default/1/layer-sha256:aa"]
    assert sorted(s.ref for s in store.list_statuses(['ref=="other"', "ref~=config"])) == [
        "default/1/config-sha256:bb", "other"]


def test_list_statuses_with_a_malformed_filter_is_invalid_argument(store):
    with pytest.raises(InvalidArgument):
        store.list_statuses(["ref=="])


def test_an_ingest_missing_its_data_file_is_skipped_and_not_found(store):
    for ref in ("broken", "fine"):
        session, _ = open_session(store, ref)
        session.close()
    (ingest_dir(store, "broken") / "data").unlink()
    assert [s.ref for s in store.list_statuses()] == ["fine"]
    with pytest.raises(NotFound):
        store.status("broken")


def test_abort_removes_the_ingest(store):
    session, _ = open_session(store, "r")
    session.handle(WriteRequest(WRITE, offset=0, data=b"abc"))
    session.close()
    store.abort("r")
    assert not ingest_dir(store, "r").exists()
    with pytest.raises(NotFound):
        store.status("r")


def test_abort_of_a_missing_ref_succeeds(store):
    store.abort("never opened")


def test_a_commit_after_its_ingest_was_aborted_fails_and_frees_the_ref(store):
    session, _ = open_session(store, "r")
    session.handle(WriteRequest(WRITE, offset=0, data=b"abc"))
    store.abort("r")
    with pytest.raises(FailedPrecondition, match="aborted"):
        session.handle(WriteRequest(COMMIT, offset=3))
    session.close()
    assert not store.exists(sha256(b"abc"))
    again, response = open_session(store, "r")
    assert response.offset == 0
    again.close()


# --------------------------------------------------------------------------- refs


BAD_REFS = ["", "..", "../escape", "a/../b", "a/..", "nul\x00byte"]


@pytest.mark.parametrize("ref", BAD_REFS, ids=repr)
def test_a_ref_that_is_empty_has_a_dotdot_segment_or_a_nul_is_invalid_argument(store, ref):
    with pytest.raises(InvalidArgument):
        store.open_writer(ref, 0, "")
    with pytest.raises(InvalidArgument):
        store.status(ref)
    with pytest.raises(InvalidArgument):
        store.abort(ref)


@pytest.mark.parametrize("ref", ["default/1/layer-sha256:" + "a" * 64, "with spaces", "a..b", ".../x", "é/ü"])
def test_refs_are_otherwise_opaque_text(store, ref):
    digest = write_blob(store, ref.encode(), ref=ref)
    assert store.exists(digest)
    session, _ = open_session(store, ref)
    session.close()
    assert store.status(ref).ref == ref


# --------------------------------------------------------------------------- one writer per ref


def test_a_second_writer_on_a_held_ref_is_unavailable(store):
    session, _ = open_session(store, "r")
    with pytest.raises(Unavailable, match=r"ref r locked for .*\(since .*\): unavailable"):
        open_session(store, "r")
    session.close()


def test_writers_on_different_refs_do_not_block_each_other(store):
    a, _ = open_session(store, "a")
    b, _ = open_session(store, "b")
    a.close()
    b.close()


def test_the_ref_is_free_again_after_close(store):
    session, _ = open_session(store, "r")
    session.close()
    again, _ = open_session(store, "r")
    again.close()


def test_the_ref_is_free_again_after_commit(store):
    session, _ = open_session(store, "r")
    session.handle(WriteRequest(COMMIT, offset=0, data=b"abc"))
    again, response = open_session(store, "r")
    assert response.offset == 0
    again.close()


def test_the_ref_is_free_again_after_a_failed_commit_and_close(store):
    session, _ = open_session(store, "r")
    with pytest.raises(FailedPrecondition):
        session.handle(WriteRequest(COMMIT, offset=0, data=b"abc", total=99))
    session.close()
    again, _ = open_session(store, "r")
    again.close()


def test_the_ref_is_free_again_after_an_already_exists_commit(store):
    write_blob(store, b"abc", ref="first")
    session, _ = open_session(store, "r")
    with pytest.raises(AlreadyExists):
        session.handle(WriteRequest(COMMIT, offset=0, data=b"abc"))
    again, _ = open_session(store, "r")
    again.close()


def test_a_failed_open_does_not_hold_the_ref(store):
    digest = write_blob(store, b"abc")
    with pytest.raises(AlreadyExists):
        open_session(store, "r", expected=digest)
    session, _ = open_session(store, "r")
    session.close()


def test_the_ref_is_free_again_after_the_expected_digest_turns_up_mid_stream(store):
    digest = write_blob(store, b"abc")
    session, _ = open_session(store, "r")
    with pytest.raises(AlreadyExists):
        session.handle(WriteRequest(STAT, expected=digest))
    again, _ = open_session(store, "r")
    again.close()
    session.close()


def _open_again_the_moment_it_is_released(store: ContentStore, ref: str) -> list[WriteSession]:
    """Simulate a writer that was waiting for ``ref``: it opens the ref as soon as it is released."""
    waiting: list[WriteSession] = []
    release = store.locks.release

    def release_then_reopen(released: str) -> None:
        release(released)
        if released == ref and not waiting:
            waiting.append(open_session(store, ref)[0])

    store.locks.release = release_then_reopen  # type: ignore[method-assign]
    return waiting


def test_a_writer_taking_the_ref_released_by_a_commit_keeps_its_new_ingest(store):
    session, _ = open_session(store, "r")
    waiting = _open_again_the_moment_it_is_released(store, "r")
    session.handle(WriteRequest(COMMIT, offset=0, data=b"abc"))
    assert len(waiting) == 1
    assert store.status("r").offset == 0
    waiting[0].handle(WriteRequest(WRITE, offset=0, data=b"next"))
    assert waiting[0].handle(WriteRequest(COMMIT, offset=4)).digest == sha256(b"next")


def test_a_writer_taking_the_ref_released_by_an_expected_digest_hit_keeps_its_new_ingest(store):
    digest = write_blob(store, b"abc")
    session, _ = open_session(store, "r")
    waiting = _open_again_the_moment_it_is_released(store, "r")
    with pytest.raises(AlreadyExists):
        session.handle(WriteRequest(STAT, expected=digest))
    assert len(waiting) == 1
    assert store.status("r").offset == 0
    waiting[0].handle(WriteRequest(WRITE, offset=0, data=b"next"))
    assert waiting[0].handle(WriteRequest(COMMIT, offset=4)).digest == sha256(b"next")


# --------------------------------------------------------------------------- resuming


def test_a_closed_writer_resumes_where_it_stopped(store):
    data = os.urandom(256)
    session, _ = open_session(store, "r", total=256)
    session.handle(WriteRequest(WRITE, offset=0, data=data[:128]))
    session.close()
    before = store.status("r")
    resumed, response = open_session(store, "r", total=256)
    assert response.offset == 128
    assert response.total == 256
    assert response.digest == sha256(data[:128])
    assert (response.started_ns, response.updated_ns) == (before.started_ns, before.updated_ns)
    resumed.handle(WriteRequest(WRITE, offset=128, data=data[128:]))
    assert resumed.handle(WriteRequest(COMMIT, offset=256)).digest == sha256(data)


def test_an_ingest_resumes_after_a_restart(root):
    data = os.urandom(5000)
    store = make_store(root)
    session, opened = open_session(store, "default/1/layer-x", total=5000)
    session.handle(WriteRequest(WRITE, offset=0, data=data[:2500]))
    session.close()
    before = store.status("default/1/layer-x")
    store.close()

    restarted = make_store(root)
    try:
        assert restarted.status("default/1/layer-x") == before
        resumed, response = open_session(restarted, "default/1/layer-x", total=5000)
        assert response.offset == 2500
        assert response.digest == sha256(data[:2500])
        assert response.started_ns == opened.started_ns
        assert response.updated_ns == before.updated_ns
        resumed.handle(WriteRequest(WRITE, offset=2500, data=data[2500:]))
        committed = resumed.handle(WriteRequest(COMMIT, offset=5000, expected=sha256(data)))
        assert committed.digest == sha256(data)
        assert restarted.info(sha256(data)).size == 5000
        assert restarted.list_statuses() == []
    finally:
        restarted.close()


def test_a_resume_with_a_different_total_starts_over_with_empty_data(store):
    session, opened = open_session(store, "r", total=10)
    session.handle(WriteRequest(WRITE, offset=0, data=b"12345"))
    session.close()
    time.sleep(0.002)
    resumed, response = open_session(store, "r", total=20)
    assert response.offset == 0
    assert response.digest == EMPTY_DIGEST
    assert response.started_ns > opened.started_ns
    assert (ingest_dir(store, "r") / "data").read_bytes() == b""
    assert store.status("r").total == 20
    resumed.close()


def test_a_resume_whose_ref_file_differs_starts_over_with_empty_data(store):
    session, _ = open_session(store, "r")
    session.handle(WriteRequest(WRITE, offset=0, data=b"12345"))
    session.close()
    (ingest_dir(store, "r") / "ref").write_text("someone else")
    resumed, response = open_session(store, "r")
    assert (response.offset, response.digest) == (0, EMPTY_DIGEST)
    assert store.status("r").ref == "r"
    resumed.close()


def test_a_resume_without_a_total_keeps_the_recorded_one(store):
    session, _ = open_session(store, "r", total=10)
    session.handle(WriteRequest(WRITE, offset=0, data=b"12345"))
    session.close()
    resumed, response = open_session(store, "r")
    assert response.offset == 5
    resumed.close()
    assert store.status("r").total == 10


def test_a_total_given_on_resume_is_recorded_when_none_was(store):
    session, _ = open_session(store, "r")
    session.handle(WriteRequest(WRITE, offset=0, data=b"12345"))
    session.close()
    resumed, response = open_session(store, "r", total=10)
    assert response.offset == 5
    resumed.close()
    assert store.status("r").total == 10


def test_a_resumed_ingest_can_be_restarted_at_offset_zero(store):
    session, _ = open_session(store, "r")
    session.handle(WriteRequest(WRITE, offset=0, data=b"stale"))
    session.close()
    resumed, _ = open_session(store, "r")
    assert resumed.handle(WriteRequest(COMMIT, offset=0, data=b"fresh")).digest == sha256(b"fresh")


# --------------------------------------------------------------------------- concurrency


def test_concurrent_writers_on_different_refs_all_commit(store):
    blobs = {f"ref-{i}": os.urandom(50_000 + i) for i in range(16)}
    barrier = threading.Barrier(len(blobs))
    errors: list[BaseException] = []

    def writer(ref: str, data: bytes) -> None:
        try:
            barrier.wait()
            session, _ = open_session(store, ref, total=len(data))
            try:
                for start in range(0, len(data), 8192):
                    session.handle(WriteRequest(WRITE, offset=start, data=data[start:start + 8192]))
                session.handle(WriteRequest(COMMIT, offset=len(data), expected=sha256(data)))
            finally:
                session.close()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=item) for item in blobs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert [i.digest for i in store.list()] == sorted(sha256(d) for d in blobs.values())
    assert store.list_statuses() == []


def test_concurrent_opens_of_one_ref_admit_exactly_one_writer(store):
    barrier = threading.Barrier(8)
    outcomes: list[object] = []
    lock = threading.Lock()

    def opener() -> None:
        barrier.wait()
        try:
            result: object = store.open_writer("r", 0, "")
        except Unavailable as exc:
            result = exc
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=opener) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    writers = [o for o in outcomes if not isinstance(o, Unavailable)]
    assert len(writers) == 1 and len(outcomes) == 8
    writers[0].close()


# --------------------------------------------------------------------------- reconcile at start


def test_a_blob_file_without_metadata_is_recorded_at_start(root):
    make_store(root).close()
    data = b"dropped in by hand"
    path = root / "blobs" / "sha256" / hashlib.sha256(data).hexdigest()
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    store = make_store(root)
    try:
        info = store.info(sha256(data))
        assert (info.size, info.labels) == (len(data), {})
        assert [i.digest for i in store.list()] == [sha256(data)]
    finally:
        store.close()


def test_metadata_without_a_blob_file_is_dropped_at_start(root):
    store = make_store(root)
    kept = write_blob(store, b"kept")
    lost = write_blob(store, b"lost", labels={"k": "v"})
    store.close()
    os.unlink(root / "blobs" / "sha256" / lost.split(":")[1])
    store = make_store(root)
    try:
        assert [i.digest for i in store.list()] == [kept]
        with pytest.raises(NotFound):
            store.info(lost)
        assert store.read_range(kept, 0, 0) == (0, 4)
    finally:
        store.close()


def test_labels_survive_a_restart(root):
    store = make_store(root)
    digest = write_blob(store, b"abc", labels={"k": "v"})
    store.close()
    store = make_store(root)
    try:
        assert store.info(digest).labels == {"k": "v"}
    finally:
        store.close()


# --------------------------------------------------------------------------- digests


@pytest.mark.parametrize(
    ("digest", "reason"),
    [
        ("", "invalid checksum digest format"),
        ("sha256", "invalid checksum digest format"),
        ("sha256:", "invalid checksum digest format"),
        (":" + "a" * 64, "invalid checksum digest format"),
        ("md5:" + "a" * 32, "unsupported digest algorithm"),
        ("SHA256:" + "a" * 64, "unsupported digest algorithm"),
        ("sha256:" + "a" * 63, "invalid checksum digest length"),
        ("sha256:" + "A" * 64, "invalid checksum digest"),
        ("sha256:" + "g" * 64, "invalid checksum digest"),
        ("sha512:" + "a" * 64, "invalid checksum digest length"),
    ],
)
def test_an_invalid_digest_is_invalid_argument_naming_it(store, digest, reason):
    with pytest.raises(InvalidArgument) as caught:
        store.info(digest)
    message = str(caught.value)
    assert message.startswith(f'"{digest}" failed validation')
    assert reason in message
    assert message.endswith(": invalid argument")


@pytest.mark.parametrize("digest", ["sha256:" + "0" * 64, "sha384:" + "0" * 96, "sha512:" + "0" * 128])
def test_sha256_sha384_and_sha512_digests_are_valid(store, digest):
    with pytest.raises(NotFound):
        store.info(digest)


# --------------------------------------------------------------------------- large blobs


def test_a_20_mib_blob_written_in_8_mib_pieces_commits(store):
    piece = 8 << 20
    total = 20 << 20
    reference = hashlib.sha256()
    session, _ = open_session(store, "big", total=total)
    offset = 0
    while offset < total:
        data = os.urandom(min(piece, total - offset))
        reference.update(data)
        response = session.handle(WriteRequest(WRITE, offset=offset, data=data))
        offset += len(data)
        assert response.offset == offset
    expected = "sha256:" + reference.hexdigest()
    committed = session.handle(WriteRequest(COMMIT, offset=total, expected=expected))
    assert committed.digest == expected
    assert store.info(expected).size == total
    assert os.path.getsize(store.blob_path(expected)) == total


@pytest.mark.parametrize("filters", [
    ["labels.team==a"], ["labels.team"], ["labels.team==a,labels.tier==gold"], ["labels.team==a", "labels.team==b"],
    ["labels.team==a,digest~=^sha256:[0-7]"], ["labels.team!=a"], ["labels.tier~=^g"], ["labels.team==zzz"],
    ["labels.team==a", "labels.tier"],
])
def test_label_filters_answered_from_the_index_equal_a_full_scan(store, filters):
    from pysnap.filters import labels_adaptor, parse_all

    for i in range(40):
        labels = {"team": "ab"[i % 2]}
        if i % 3 == 0:
            labels["tier"] = "gold" if i % 2 else "silver"
        write_blob(store, f"blob {i}".encode(), labels=labels)
    everything = store.list()
    selector = parse_all(filters)
    expected = [i.digest for i in everything if selector.match(labels_adaptor({"digest": i.digest}, i.labels))]
    assert [i.digest for i in store.list(filters)] == expected
