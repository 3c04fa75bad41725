"""A read-only reader of bbolt files (``go.etcd.io/bbolt``), the store behind Atlantis's BoltDB.

A bbolt file is an array of fixed-size pages. Pages 0 and 1 are *meta* pages; a commit writes
the one numbered ``txid % 2``, so the valid meta with the highest transaction id names the last
committed state, and the other one is the state before it. A meta names the root bucket, whose
B+tree maps bucket names to bucket headers. Every bucket is a B+tree of *branch* pages (keys
and child page ids) and *leaf* pages (keys and values); a page larger than one page spans
``overflow`` further pages. A small bucket without sub-buckets is *inline*: its leaf page is
stored inside the parent's value, right after the 16-byte bucket header, instead of in a page
of its own. Pages freed by later commits (listed on the freelist page) are never reached from
the current meta, so walking the trees sees exactly the last committed data.

Layout, little-endian as written on amd64 and arm64 (bbolt writes its host's byte order)::

    page header   id u64 · flags u16 · count u16 · overflow u32                (16 bytes)
    meta          magic u32 · version u32 · pageSize u32 · flags u32 ·
                  root {pgid u64 · sequence u64} · freelist u64 · pgid u64 ·
                  txid u64 · checksum u64 (FNV-64a of the 56 bytes before it)
    branch elem   pos u32 · ksize u32 · pgid u64                               (16 bytes)
    leaf elem     flags u32 · pos u32 · ksize u32 · vsize u32                  (16 bytes)

``pos`` counts from the element's own first byte; a leaf element with flag ``0x01`` is a nested
bucket whose value is a bucket header (root pgid, sequence), followed by the inline page when
the root pgid is 0.

Every read is bounds-checked: a file that is not bbolt, or a damaged one, raises
:class:`BoltFormatError` naming the byte offset where the reader gave up. The file is opened
with a shared ``flock``, as bbolt's own read-only mode does, so a file that a running Atlantis
holds (it keeps an exclusive lock while it runs) is refused instead of being read mid-commit.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = ["BoltBucket", "BoltDB", "BoltFileLocked", "BoltFormatError", "Meta"]

MAGIC = 0xED0CDAED
VERSION = 2
PAGE_HEADER = struct.Struct("<QHHI")
META = struct.Struct("<IIII QQ QQQQ")
BRANCH_ELEMENT = struct.Struct("<IIQ")
LEAF_ELEMENT = struct.Struct("<IIII")
BUCKET_HEADER = struct.Struct("<QQ")
BRANCH_PAGE, LEAF_PAGE, META_PAGE, FREELIST_PAGE = 0x01, 0x02, 0x04, 0x10
BUCKET_LEAF_FLAG = 0x01
_CHECKSUMMED = META.size - 8  # the checksum covers the meta up to itself
_MIN_PAGE_SIZE = 512  # bbolt accepts smaller ones in theory; no real file has them
_MAX_PAGE_SIZE = 1 << 30
_FNV_OFFSET, _FNV_PRIME = 0xCBF29CE484222325, 0x100000001B3


class BoltFormatError(Exception):
    """The file is not a bbolt file, or is damaged; the message names the offset."""

    def __init__(self, message: str, *, offset: int | None = None) -> None:
        super().__init__(message if offset is None else f"{message} (at byte offset {offset})")
        self.offset = offset


class BoltFileLocked(Exception):
    """Another process (a running Atlantis) holds the file's exclusive lock."""


def fnv64a(data: bytes) -> int:
    """FNV-1a, 64 bits: bbolt's meta checksum (Go's ``hash/fnv.New64a``)."""
    value = _FNV_OFFSET
    for byte in data:
        value = ((value ^ byte) * _FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return value


@dataclass(frozen=True)
class Meta:
    """One meta page, decoded and validated."""

    page: int
    page_size: int
    flags: int
    root: int
    root_sequence: int
    freelist: int
    high_water: int
    txid: int


def _parse_meta(data: bytes | mmap.mmap, offset: int, page: int) -> Meta | str:
    """The meta at ``offset`` (a page start), or why it is not a valid one."""
    start = offset + PAGE_HEADER.size
    if start + META.size > len(data):
        return f"meta page {page} is past the end of the file (offset {offset})"
    (magic, version, page_size, flags, root, sequence, freelist, high_water, txid,
     checksum) = META.unpack_from(data, start)
    if magic != MAGIC:
        if magic == int.from_bytes(MAGIC.to_bytes(4, "little"), "big"):
            return (f"meta page {page} at offset {offset} was written on a big-endian machine; "
                    "only little-endian bbolt files can be read")
        return f"no bbolt magic at offset {start} (found 0x{magic:08x})"
    if version != VERSION:
        return f"meta page {page} has format version {version}; only version {VERSION} is read"
    if fnv64a(bytes(data[start:start + _CHECKSUMMED])) != checksum:
        return f"meta page {page} at offset {offset} fails its checksum"
    return Meta(page=page, page_size=page_size, flags=flags, root=root, root_sequence=sequence,
                freelist=freelist, high_water=high_water, txid=txid)


@dataclass(frozen=True)
class _Page:
    """A page's bytes: a span of the file, or an inline page inside a bucket value."""

    data: bytes | mmap.mmap
    start: int  # where the page header begins in ``data``
    end: int  # one past the page's last byte (including overflow pages)
    file_offset: int | None  # where ``start`` is in the file; None for an inline page
    label: str
    flags: int
    count: int

    def where(self, position: int) -> int | None:
        return None if self.file_offset is None else self.file_offset + (position - self.start)


class BoltBucket:
    """One bucket of an open file: iterate its values and its nested buckets, in key order.

    ``get`` and ``bucket`` walk the bucket rather than searching the tree: an importer reads
    every key anyway, and Atlantis's files are small.
    """

    def __init__(self, db: BoltDB, name: bytes, root: int, inline: bytes | None,
                 sequence: int) -> None:
        self._db = db
        self.name = name
        self.root = root
        self.sequence = sequence
        self._inline = inline

    @property
    def inline(self) -> bool:
        """True when the bucket's only page lives inside its parent's value."""
        return self._inline is not None

    def entries(self) -> Iterator[tuple[bytes, bytes, bool]]:
        """Every ``(key, value, is_bucket)`` in key order; a bucket's value is its header."""
        if self._inline is not None:
            page = self._db._inline_page(self._inline, self.name)
            yield from self._db._walk(page, set())
        else:
            yield from self._db._walk(self._db._page(self.root, f"bucket {self._label()}"), set())

    def items(self) -> Iterator[tuple[bytes, bytes]]:
        """Every key and value of this bucket (nested buckets left out)."""
        for key, value, is_bucket in self.entries():
            if not is_bucket:
                yield key, value

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        return self.items()

    def buckets(self) -> Iterator[BoltBucket]:
        """The nested buckets, in key order."""
        for key, value, is_bucket in self.entries():
            if is_bucket:
                yield self._db._open_bucket(key, value, parent=self)

    def bucket(self, name: bytes | str) -> BoltBucket | None:
        """The nested bucket ``name``, or None."""
        wanted = name.encode() if isinstance(name, str) else name
        for key, value, is_bucket in self.entries():
            if key == wanted:
                return self._db._open_bucket(key, value, parent=self) if is_bucket else None
        return None

    def get(self, key: bytes | str) -> bytes | None:
        wanted = key.encode() if isinstance(key, str) else key
        for found, value, is_bucket in self.entries():
            if found == wanted and not is_bucket:
                return value
        return None

    def __len__(self) -> int:
        return sum(1 for _ in self.items())

    def _label(self) -> str:
        return self.name.decode(errors="replace") or "(root)"


class BoltDB:
    """A bbolt file opened read-only: ``with BoltDB.open(path) as db: db.bucket("runLocks")``."""

    def __init__(self, path: Path, data: bytes | mmap.mmap, meta: Meta,
                 handle: int | None = None) -> None:
        self.path = path
        self.meta = meta
        self._data = data
        self._handle = handle

    # --- opening -------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, lock: bool = True) -> BoltDB:
        """Open ``path``; raise ``BoltFormatError`` unless it is a readable bbolt file."""
        file = Path(path)
        handle = os.open(file, os.O_RDONLY)
        try:
            if lock:
                try:
                    fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except OSError as error:
                    if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise BoltFileLocked(
                            f"{file} is locked by another process (a running Atlantis keeps its "
                            "database locked): stop Atlantis first"
                        ) from None
                    raise
            size = os.fstat(handle).st_size
            if size == 0:
                raise BoltFormatError(f"{file} is not a bbolt file: it is empty")
            data: bytes | mmap.mmap = mmap.mmap(handle, 0, access=mmap.ACCESS_READ)
            meta = cls._choose_meta(data, file)
            db = cls(file, data, meta, handle)
            db._check_meta()
        except BaseException:
            os.close(handle)
            raise
        return db

    @staticmethod
    def _choose_meta(data: bytes | mmap.mmap, file: Path) -> Meta:
        # As bbolt does: the page size comes from whichever meta validates, page 0 first, then
        # page 1 tried at every page size from 1 KiB to 16 MiB.
        if len(data) < PAGE_HEADER.size + META.size:
            raise BoltFormatError(
                f"{file} is not a bbolt file: {len(data)} bytes is too small to hold a meta page"
            )
        first = _parse_meta(data, 0, 0)
        candidates = [first] if isinstance(first, Meta) else []
        page_size = first.page_size if isinstance(first, Meta) else None
        second: Meta | str = "not found"
        if page_size is not None:
            second = _parse_meta(data, page_size, 1)
        else:
            for shift in range(15):
                offset = 1024 << shift
                if offset + PAGE_HEADER.size + META.size > len(data):
                    break
                second = _parse_meta(data, offset, 1)
                if isinstance(second, Meta) and second.page_size == offset:
                    break
        if isinstance(second, Meta):
            candidates.append(second)
        if not candidates:
            reason = first if isinstance(first, str) else "no valid meta page"
            if isinstance(second, str) and "magic" not in second and second != "not found":
                reason = f"{reason}; {second}"
            raise BoltFormatError(f"{file} is not a readable bbolt file: {reason}")
        # The newest valid commit wins; the other meta is the commit before it.
        return max(candidates, key=lambda meta: meta.txid)

    def _check_meta(self) -> None:
        meta, size = self.meta, len(self._data)
        where = meta.page * meta.page_size + PAGE_HEADER.size
        if not _MIN_PAGE_SIZE <= meta.page_size <= _MAX_PAGE_SIZE:
            raise BoltFormatError(f"{self.path}: implausible page size {meta.page_size}",
                                  offset=where + 8)
        if meta.high_water * meta.page_size > size:
            raise BoltFormatError(
                f"{self.path} is truncated: its meta counts {meta.high_water} pages of "
                f"{meta.page_size} bytes ({meta.high_water * meta.page_size} bytes) but the "
                f"file has {size}", offset=where + 40)
        if not 2 <= meta.root < meta.high_water:
            raise BoltFormatError(
                f"{self.path}: root bucket page {meta.root} is outside the file's "
                f"{meta.high_water} pages", offset=where + 16)

    def close(self) -> None:
        if isinstance(self._data, mmap.mmap):
            self._data.close()
        if self._handle is not None:
            os.close(self._handle)  # closing the descriptor releases the flock
            self._handle = None

    def __enter__(self) -> BoltDB:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    # --- buckets -------------------------------------------------------------------------------
    @property
    def root(self) -> BoltBucket:
        """The root bucket: its entries are the top-level buckets."""
        return BoltBucket(self, b"", self.meta.root, None, self.meta.root_sequence)

    def buckets(self) -> Iterator[BoltBucket]:
        return self.root.buckets()

    def bucket(self, *path: bytes | str) -> BoltBucket | None:
        """The bucket at ``path`` (nested names), or None if any part is missing."""
        current: BoltBucket | None = self.root
        for name in path:
            if current is None:
                return None
            current = current.bucket(name)
        return current

    def _open_bucket(self, name: bytes, value: bytes, *, parent: BoltBucket) -> BoltBucket:
        if len(value) < BUCKET_HEADER.size:
            raise BoltFormatError(
                f"{self.path}: bucket {name!r} in {parent._label()} has a {len(value)}-byte "
                f"header (expected {BUCKET_HEADER.size})")
        root, sequence = BUCKET_HEADER.unpack_from(value, 0)
        if root == 0:
            return BoltBucket(self, name, 0, bytes(value[BUCKET_HEADER.size:]), sequence)
        if not 2 <= root < self.meta.high_water:
            raise BoltFormatError(
                f"{self.path}: bucket {name!r} points at page {root}, outside the file's "
                f"{self.meta.high_water} pages")
        return BoltBucket(self, name, root, None, sequence)

    # --- pages ---------------------------------------------------------------------------------
    def _page(self, pgid: int, label: str) -> _Page:
        size, page_size = len(self._data), self.meta.page_size
        offset = pgid * page_size
        if not 2 <= pgid < self.meta.high_water or offset + PAGE_HEADER.size > size:
            raise BoltFormatError(
                f"{self.path}: {label} refers to page {pgid}, outside the file's "
                f"{self.meta.high_water} pages")
        found, flags, count, overflow = PAGE_HEADER.unpack_from(self._data, offset)
        if found != pgid:
            raise BoltFormatError(
                f"{self.path}: page {pgid} ({label}) identifies itself as page {found}",
                offset=offset)
        if flags not in (BRANCH_PAGE, LEAF_PAGE):
            raise BoltFormatError(
                f"{self.path}: page {pgid} ({label}) should be a branch or leaf page but has "
                f"flags 0x{flags:02x}", offset=offset + 8)
        end = offset + (overflow + 1) * page_size
        if pgid + overflow >= self.meta.high_water or end > size:
            raise BoltFormatError(
                f"{self.path}: page {pgid} ({label}) with {overflow} overflow pages runs past "
                "the end of the file", offset=offset + 12)
        return _Page(self._data, offset, end, offset, f"page {pgid}", flags, count)

    def _inline_page(self, value: bytes, name: bytes) -> _Page:
        label = f"inline bucket {name.decode(errors='replace')!r}"
        if len(value) < PAGE_HEADER.size:
            raise BoltFormatError(f"{self.path}: {label} is only {len(value)} bytes long")
        _, flags, count, _ = PAGE_HEADER.unpack_from(value, 0)
        if flags != LEAF_PAGE:
            raise BoltFormatError(
                f"{self.path}: {label} should hold a leaf page but has flags 0x{flags:02x}")
        return _Page(value, 0, len(value), None, label, flags, count)

    def _walk(self, page: _Page, seen: set[int]) -> Iterator[tuple[bytes, bytes, bool]]:
        """Depth-first over a B+tree from ``page``: leaf entries in key order."""
        if page.file_offset is not None:
            if page.file_offset in seen:
                raise BoltFormatError(f"{self.path}: {page.label} is reached twice (a cycle)",
                                      offset=page.file_offset)
            seen.add(page.file_offset)
        first = page.start + PAGE_HEADER.size
        size = BRANCH_ELEMENT.size if page.flags == BRANCH_PAGE else LEAF_ELEMENT.size
        if first + page.count * size > page.end:
            raise BoltFormatError(
                f"{self.path}: {page.label} claims {page.count} elements, more than fit",
                offset=page.where(page.start + 10))
        for index in range(page.count):
            at = first + index * size
            if page.flags == BRANCH_PAGE:
                pos, ksize, child = BRANCH_ELEMENT.unpack_from(page.data, at)
                self._span(page, at, at + pos, ksize, index)
                yield from self._walk(self._page(child, f"child {index} of {page.label}"), seen)
            else:
                flags, pos, ksize, vsize = LEAF_ELEMENT.unpack_from(page.data, at)
                self._span(page, at, at + pos, ksize + vsize, index)
                key = bytes(page.data[at + pos:at + pos + ksize])
                value = bytes(page.data[at + pos + ksize:at + pos + ksize + vsize])
                yield key, value, bool(flags & BUCKET_LEAF_FLAG)

    def _span(self, page: _Page, element: int, start: int, length: int, index: int) -> None:
        if start + length > page.end:
            raise BoltFormatError(
                f"{self.path}: element {index} of {page.label} points past the page's end",
                offset=page.where(element))
