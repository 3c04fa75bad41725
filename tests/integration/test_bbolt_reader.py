"""The bbolt reader against files written by the real bbolt library.

Every file here is written by ``tests/bbolt_writer`` (Go, ``go.etcd.io/bbolt``), which also
prints what bbolt itself reads back; the reader must find exactly that. The files are shaped to
reach each part of the format: branch pages, overflow pages, inline and nested buckets, free
pages left by deletes and updates, other page sizes, and damaged files.
"""

from __future__ import annotations

import fcntl
import os
import struct
import sys
from pathlib import Path
from typing import Any

import pytest

_REPO_ROOT = Path(__file__).resolve().parents[2]
if str(_REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(_REPO_ROOT))

from tests.support.bbolt_writer import (  # noqa: E402
    BoltWriter,
    atlantis_lock,
    lock_key,
)

from enhanced_locking.migration.bbolt import (  # noqa: E402
    BoltBucket,
    BoltDB,
    BoltFileLocked,
    BoltFormatError,
    fnv64a,
)

Tree = dict[str, Any]


def _tree(bucket: BoltBucket) -> Tree:
    """What the reader sees, in the writer's dump shape."""
    return {
        "nameHex": bucket.name.hex(),
        "items": [[key.hex(), value.hex()] for key, value in bucket.items()],
        "buckets": [_tree(child) for child in bucket.buckets()],
    }


def _strip(dumped: Tree) -> Tree:
    return {
        "nameHex": dumped["nameHex"],
        "items": dumped["items"],
        "buckets": [_strip(child) for child in dumped["buckets"]],
    }


def assert_reads_like_bbolt(path: Path, dump: dict[str, Any]) -> None:
    with BoltDB.open(path) as db:
        assert db.meta.page_size == dump["pageSize"]
        assert db.meta.txid == dump["txid"]
        assert [_tree(b) for b in db.buckets()] == [_strip(b) for b in dump["buckets"]]


def _stats(dump: dict[str, Any], name: str) -> dict[str, int]:
    bucket = next(b for b in dump["buckets"] if bytes.fromhex(b["nameHex"]) == name.encode())
    stats: dict[str, int] = bucket["stats"]
    return stats


def _locks(count: int, *, repo: str = "acme/infra") -> list[dict[str, Any]]:
    return [
        atlantis_lock(repo=repo, pull=1 + i % 37, path=f"envs/stack-{i:04d}",
                      workspace=("default", "staging", "prod")[i % 3],
                      project_name=f"project-{i}" if i % 2 else "")
        for i in range(count)
    ]


def _puts(locks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"op": "putLock", "bucket": ["runLocks"], "key": lock_key(lock), "lock": lock}
            for lock in locks]


# --- reading what bbolt wrote ----------------------------------------------------------------


@pytest.mark.parametrize("page_size", [0, 1024, 16384], ids=["os-default", "1k", "16k"])
def test_reads_every_key_of_a_bucket_that_spans_many_pages(
    bolt_writer: BoltWriter, tmp_path: Path, page_size: int
) -> None:
    path = tmp_path / "atlantis.db"
    locks = _locks(600)
    dump = bolt_writer.write(path, [[{"op": "createBucket", "bucket": ["runLocks"]}],
                                    _puts(locks[:300]), _puts(locks[300:])], page_size=page_size)
    stats = _stats(dump, "runLocks")
    assert stats["BranchPageN"] >= 1 and stats["LeafPageN"] > 10  # really a multi-level tree
    assert_reads_like_bbolt(path, dump)
    with BoltDB.open(path) as db:
        bucket = db.bucket("runLocks")
        assert bucket is not None and not bucket.inline
        assert len(bucket) == 600
        assert bucket.get(lock_key(locks[123])) is not None


def test_reads_a_value_that_needs_overflow_pages(bolt_writer: BoltWriter, tmp_path: Path) -> None:
    path = tmp_path / "big.db"
    big = atlantis_lock(repo="acme/big", pull=7, user="x" * 60_000)
    dump = bolt_writer.write(path, [[
        {"op": "putLock", "bucket": ["runLocks"], "key": lock_key(big), "lock": big},
        {"op": "put", "bucket": ["runLocks"], "key": "zz-bytes", "fill": {"byte": "Z",
                                                                          "count": 200_000}},
        *_puts(_locks(40)),
    ]])
    assert _stats(dump, "runLocks")["LeafOverflowN"] >= 10
    assert_reads_like_bbolt(path, dump)
    with BoltDB.open(path) as db:
        bucket = db.bucket("runLocks")
        assert bucket is not None
        assert bucket.get("zz-bytes") == b"Z" * 200_000
        assert b'"Username":"' + b"x" * 60_000 in (bucket.get(lock_key(big)) or b"")


def test_reads_the_last_commit_after_deletes_and_updates_left_free_pages(
    bolt_writer: BoltWriter, tmp_path: Path
) -> None:
    path = tmp_path / "churn.db"
    locks = _locks(400)
    deletes = [{"op": "delete", "bucket": ["runLocks"], "key": lock_key(lock)}
               for lock in locks[::2]]
    updated = [dict(lock, Workspace=lock["Workspace"]) for lock in locks[1::4]]
    for lock in updated:
        lock["User"] = {"Username": "updated", "Teams": ["ops"]}
    dump = bolt_writer.write(path, [
        _puts(locks),
        deletes,
        _puts(updated),
        [{"op": "put", "bucket": ["pulls"], "key": f"github.com::acme/infra::{n}",
          "value": "{}"} for n in range(50)],
        [{"op": "deleteBucket", "bucket": [], "key": "pulls"}],
    ])
    assert dump["freePageN"] + dump["pendingPageN"] > 0  # the file has pages nothing points to
    assert_reads_like_bbolt(path, dump)
    with BoltDB.open(path) as db:
        bucket = db.bucket("runLocks")
        assert bucket is not None and len(bucket) == 200
        assert bucket.get(lock_key(locks[0])) is None  # deleted
        assert b'"Username":"updated"' in (bucket.get(lock_key(locks[1])) or b"")
        assert db.bucket("pulls") is None


def test_reads_inline_and_nested_buckets_and_binary_keys(
    bolt_writer: BoltWriter, tmp_path: Path
) -> None:
    path = tmp_path / "nested.db"
    dump = bolt_writer.write(path, [[
        {"op": "put", "bucket": ["runLocks"], "key": "only", "value": "one small value"},
        {"op": "put", "bucket": ["outer", "small"], "key": "a", "value": "1"},
        {"op": "put", "bucket": ["outer", "small"], "keyHex": "00ff10", "valueHex": "deadbeef"},
        {"op": "put", "bucket": ["outer", "small", "deeper"], "key": "b", "value": "2"},
        *[{"op": "put", "bucket": ["outer", "large"], "key": f"k{i:05d}", "fill":
           {"byte": "v", "count": 300}} for i in range(500)],
        {"op": "put", "bucket": ["outer"], "key": "plain", "value": "beside the buckets"},
        {"op": "createBucket", "bucket": ["empty"]},
    ]])
    assert _stats(dump, "runLocks")["InlineBucketN"] == 1
    assert _stats(dump, "outer")["InlineBucketN"] >= 1
    assert_reads_like_bbolt(path, dump)
    with BoltDB.open(path) as db:
        run_locks, small = db.bucket("runLocks"), db.bucket("outer", "small")
        assert run_locks is not None and run_locks.inline
        assert small is not None and small.get(bytes.fromhex("00ff10")) == b"\xde\xad\xbe\xef"
        deeper = db.bucket("outer", "small", "deeper")
        assert deeper is not None and deeper.get("b") == b"2"
        large = db.bucket("outer", "large")
        assert large is not None and not large.inline and len(large) == 500
        empty = db.bucket("empty")
        assert empty is not None and list(empty.items()) == []
        assert db.bucket("outer", "plain") is None  # a value, not a bucket
        assert db.bucket("missing") is None


# --- meta pages ------------------------------------------------------------------------------


def _meta_offsets(path: Path) -> list[tuple[int, int]]:
    """(offset of the meta struct, txid) of both meta pages."""
    data = path.read_bytes()
    page_size = struct.unpack_from("<I", data, 16 + 8)[0]
    out = []
    for page in (0, 1):
        start = page * page_size + 16
        out.append((start, struct.unpack_from("<Q", data, start + 48)[0]))
    return out


def _flip(path: Path, offset: int) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


def test_checksum_is_fnv64a_over_the_meta_before_it(bolt_writer: BoltWriter,
                                                     tmp_path: Path) -> None:
    path = tmp_path / "meta.db"
    bolt_writer.write(path, [[{"op": "createBucket", "bucket": ["runLocks"]}]])
    data = path.read_bytes()
    assert fnv64a(b"") == 0xCBF29CE484222325
    assert fnv64a(data[16:16 + 56]) == struct.unpack_from("<Q", data, 16 + 56)[0]


def test_falls_back_to_the_previous_commit_when_the_newest_meta_is_damaged(
    bolt_writer: BoltWriter, tmp_path: Path
) -> None:
    path = tmp_path / "fallback.db"
    bolt_writer.write(path, [
        [{"op": "put", "bucket": ["runLocks"], "key": "first", "value": "1"}],
        [{"op": "put", "bucket": ["runLocks"], "key": "second", "value": "2"}],
    ])
    (newest, newest_txid), (_, older_txid) = sorted(
        _meta_offsets(path), key=lambda meta: -meta[1])
    _flip(path, newest + 4 * 4 + 8)  # a byte of the root bucket's page id
    with BoltDB.open(path) as db:
        assert db.meta.txid == older_txid == newest_txid - 1
        bucket = db.bucket("runLocks")
        assert bucket is not None and dict(bucket.items()) == {b"first": b"1"}


def test_both_meta_pages_damaged_is_a_format_error_naming_the_offset(
    bolt_writer: BoltWriter, tmp_path: Path
) -> None:
    path = tmp_path / "broken.db"
    bolt_writer.write(path, [[{"op": "createBucket", "bucket": ["runLocks"]}]])
    for start, _ in _meta_offsets(path):
        _flip(path, start + 40)
    with pytest.raises(BoltFormatError, match=r"meta page 0 at offset 0 fails its checksum"):
        BoltDB.open(path)


# --- not bbolt, or damaged -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "it is empty"),
        (b"SQLite format 3\x00" + bytes(8192), "no bbolt magic at offset 16"),
        (b"hello\n", "too small to hold a meta page"),
        (os.urandom(64 * 1024), "no bbolt magic at offset 16"),
    ],
    ids=["empty", "sqlite", "text", "random"],
)
def test_a_file_that_is_not_bbolt_is_refused(tmp_path: Path, content: bytes,
                                             message: str) -> None:
    path = tmp_path / "not.db"
    path.write_bytes(content)
    with pytest.raises(BoltFormatError, match=message):
        BoltDB.open(path)


def test_a_truncated_file_is_refused_with_the_offset(bolt_writer: BoltWriter,
                                                     tmp_path: Path) -> None:
    path = tmp_path / "cut.db"
    dump = bolt_writer.write(path, [_puts(_locks(300))])
    with path.open("r+b") as handle:
        handle.truncate(6 * dump["pageSize"])
    with pytest.raises(BoltFormatError, match=r"truncated.*at byte offset \d+"):
        BoltDB.open(path)


def test_a_damaged_page_is_a_format_error_naming_its_offset(
    bolt_writer: BoltWriter, tmp_path: Path
) -> None:
    path = tmp_path / "page.db"
    dump = bolt_writer.write(path, [_puts(_locks(300))])
    with BoltDB.open(path) as db:
        bucket = db.bucket("runLocks")
        assert bucket is not None
        root = bucket.root
    offset = root * dump["pageSize"]
    with path.open("r+b") as handle:  # the bucket's root page now claims another id
        handle.seek(offset)
        handle.write(struct.pack("<Q", root + 1000))
    with BoltDB.open(path) as db, pytest.raises(
        BoltFormatError, match=rf"page {root} .* identifies itself as page {root + 1000} "
                               rf"\(at byte offset {offset}\)"
    ):
        list(db.bucket("runLocks") or [])


def test_an_element_pointing_past_its_page_is_a_format_error(
    bolt_writer: BoltWriter, tmp_path: Path
) -> None:
    path = tmp_path / "elem.db"
    dump = bolt_writer.write(path, [_puts(_locks(300))])
    with BoltDB.open(path) as db:
        bucket = db.bucket("runLocks")
        assert bucket is not None
        leaf = next(b for b in _leaf_pages(db, bucket.root, dump["pageSize"]))
    element = leaf * dump["pageSize"] + 16
    with path.open("r+b") as handle:  # the first element's ksize: far beyond the page
        handle.seek(element + 8)
        handle.write(struct.pack("<I", 10**8))
    with BoltDB.open(path) as db, pytest.raises(
        BoltFormatError, match=rf"element 0 of page {leaf} points past.*offset {element}\)"
    ):
        list(db.bucket("runLocks") or [])


def _leaf_pages(db: BoltDB, root: int, page_size: int) -> list[int]:
    data = db.path.read_bytes()
    flags, count = struct.unpack_from("<HH", data, root * page_size + 8)
    if flags == 0x02:
        return [root]
    children = [struct.unpack_from("<IIQ", data, root * page_size + 16 + 16 * i)[2]
                for i in range(count)]
    return [leaf for child in children for leaf in _leaf_pages(db, child, page_size)]


def test_a_file_locked_by_a_running_atlantis_is_refused(bolt_writer: BoltWriter,
                                                        tmp_path: Path) -> None:
    path = tmp_path / "atlantis.db"
    bolt_writer.write(path, [[{"op": "createBucket", "bucket": ["runLocks"]}]])
    with path.open("rb") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what bbolt.Open does in Atlantis
        with pytest.raises(BoltFileLocked, match="stop Atlantis first"):
            BoltDB.open(path)
    with BoltDB.open(path) as db:  # released: readable again
        assert db.bucket("runLocks") is not None


@pytest.mark.parametrize("page_size", [0, 16384], ids=["os-default", "16k"])
def test_a_damaged_first_meta_page_is_skipped_by_probing_for_the_second(
    bolt_writer: BoltWriter, tmp_path: Path, page_size: int
) -> None:
    path = tmp_path / "probe.db"
    dump = bolt_writer.write(path, [
        [{"op": "put", "bucket": ["runLocks"], "key": "first", "value": "1"}],
        [{"op": "put", "bucket": ["runLocks"], "key": "second", "value": "2"}],
        [{"op": "put", "bucket": ["runLocks"], "key": "third", "value": "3"}],
    ], page_size=page_size)
    (first, first_txid), (_, second_txid) = _meta_offsets(path)
    _flip(path, first)  # page 0's magic: the page size must now come from page 1
    with BoltDB.open(path) as db:
        assert db.meta.page == 1 and db.meta.page_size == dump["pageSize"]
        assert db.meta.txid == second_txid
        bucket = db.bucket("runLocks")
        expected = {b"first": b"1", b"second": b"2", b"third": b"3"}
        if first_txid > second_txid:  # page 0 held the last commit: we see the one before
            expected.pop(b"third")
        assert bucket is not None and dict(bucket.items()) == expected
