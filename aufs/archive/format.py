"""The tar format: parsing one header block, PAX records and GNU sparse maps, and building
headers. Strict on purpose: a layer archive is untrusted input.

Only the byte layout lives here; the stream handling is in tarstream.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from aufs import _implementation as native

BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)

REGULAR, REGULAR_OLD, CONTIGUOUS = b"0", b"\0", b"7"
HARDLINK, SYMLINK, CHAR, BLOCK_DEVICE, DIRECTORY, FIFO = b"1", b"2", b"3", b"4", b"5", b"6"
PAX_LOCAL, PAX_GLOBAL = b"x", b"g"
GNU_LONGNAME, GNU_LONGLINK, GNU_SPARSE = b"L", b"K", b"S"
HEADER_ONLY_TYPES = frozenset({HARDLINK, SYMLINK, CHAR, BLOCK_DEVICE, DIRECTORY, FIFO})
FILE_TYPES = frozenset({REGULAR, REGULAR_OLD, CONTIGUOUS, GNU_SPARSE}) | HEADER_ONLY_TYPES

MAX_EXTENDED_HEADER = 1 << 20  # a PAX or GNU long-name header larger than this is hostile


class TarFormatError(ValueError):
    """A header or record that is not valid tar; the reader names the entry."""


@dataclass
class TarHeader:
    """One member as the archive describes it, after PAX and GNU extensions are applied."""

    name: str
    typeflag: bytes
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    size: int = 0  # bytes of data stored in the archive
    mtime_ns: int = 0
    atime_ns: int | None = None
    linkname: str = ""
    uname: str = ""
    gname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)
    sparse: list[tuple[int, int]] | None = None  # (offset, length) segments of the real file
    realsize: int | None = None  # the real size of a sparse file


def parse_number(raw: bytes, what: str) -> int:
    """An octal field (digits between spaces, ended by NUL) or a GNU base-256 one."""
    try:
        return native.parse_tar_number(raw, what)
    except ValueError as error:
        raise TarFormatError(str(error)) from None


def parse_header(block: bytes) -> TarHeader:
    """The fields of one 512-byte header block (no extensions applied yet)."""
    try:
        (name, typeflag, mode, uid, gid, size, mtime, linkname, devmajor, devminor,
         gnu) = native.parse_tar_header(block)
    except ValueError as error:
        raise TarFormatError(str(error)) from None
    if size < 0:
        raise TarFormatError(f"negative size {size}")
    header = TarHeader(name=os.fsdecode(name), typeflag=typeflag, mode=mode, uid=uid, gid=gid,
                       size=size, mtime_ns=mtime * 1_000_000_000,
                       linkname=os.fsdecode(linkname) if linkname else "",
                       devmajor=devmajor, devminor=devminor)
    if typeflag == GNU_SPARSE:
        if not gnu:  # star's sparse headers share the typeflag with another layout (as Go)
            raise TarFormatError(f"entry {header.name!r}: a GNU sparse entry (typeflag 'S') "
                                 "without the GNU magic")
        header.sparse = parse_gnu_sparse_entries(block[386:482])
        header.realsize = parse_number(block[483:495], "realsize")
    return header


def gnu_sparse_is_extended(block: bytes) -> bool:
    """Whether an old-GNU sparse header (or extension block) is followed by another."""
    return block[482] != 0


def parse_gnu_sparse_entries(raw: bytes) -> list[tuple[int, int]]:
    segments = []
    for start in range(0, len(raw) - 23, 24):
        offset_raw, length_raw = raw[start:start + 12], raw[start + 12:start + 24]
        if not offset_raw.strip(b"\0"):
            break
        segments.append((parse_number(offset_raw, "sparse offset"),
                         parse_number(length_raw, "sparse length")))
    return segments


def parse_pax(data: bytes) -> dict[str, bytes]:
    """PAX records: "<length> <key>=<value>\\n", each length counting the whole record."""
    records: dict[str, bytes] = {}
    position = 0
    while position < len(data):
        if data[position] == 0:  # NUL padding at the end
            if data[position:].strip(b"\0"):
                raise TarFormatError("data after NUL padding in a PAX header")
            break
        space = data.find(b" ", position, position + 21)
        if space < 0:
            raise TarFormatError("PAX record without a length")
        try:
            length = int(data[position:space])
        except ValueError:
            raise TarFormatError("PAX record length is not a number") from None
        end = position + length
        if length <= space - position + 1 or end > len(data) or data[end - 1] != 0x0A:
            raise TarFormatError("PAX record length does not match its content")
        key, separator, value = data[space + 1:end - 1].partition(b"=")
        if not separator or not key:
            raise TarFormatError("PAX record without key=value")
        records[key.decode("utf-8", "surrogateescape")] = value
        position = end
    return records


ID_LIMIT = 2**32 - 1  # (uid_t)-1 means "no change" to chown
TIME_LIMIT_NS = 2**33 * 1_000_000_000  # about 272 years either side of 1970
SIZE_LIMIT = 2**63  # Go's archive/tar (an int64) and the native reader take no more


def check_ranges(header: TarHeader) -> None:
    """Refuses numbers no filesystem can take: the header parsed, but it is not a file."""
    if header.size >= SIZE_LIMIT:
        raise TarFormatError(f"size {header.size} is out of range")
    for what, value, limit in (("uid", header.uid, ID_LIMIT), ("gid", header.gid, ID_LIMIT),
                               ("devmajor", header.devmajor, 2**32),
                               ("devminor", header.devminor, 2**32)):
        if not 0 <= value < limit:
            raise TarFormatError(f"{what} {value} is out of range")
    for what, time_ns in (("mtime", header.mtime_ns), ("atime", header.atime_ns)):
        if time_ns is not None and not -TIME_LIMIT_NS < time_ns < TIME_LIMIT_NS:
            raise TarFormatError(f"{what} {time_ns // 1_000_000_000} s is out of range")
    if header.realsize is not None and header.realsize < 0:
        raise TarFormatError(f"negative sparse size {header.realsize}")


def parse_decimal(value: bytes, what: str) -> int:
    text = value.decode("ascii", "replace")
    if not text.isdigit():
        raise TarFormatError(f"PAX {what} {text!r} is not a decimal number")
    return int(text)


def parse_pax_time(value: bytes, what: str) -> int:
    """A PAX time ("seconds[.fraction]", maybe negative) in nanoseconds."""
    text = value.decode("ascii", "replace")
    negative = text.startswith("-")
    whole, _, fraction = text.lstrip("-").partition(".")
    if not whole.isdigit() or (fraction and not fraction.isdigit()):
        raise TarFormatError(f"PAX {what} {text!r} is not a time")
    nanoseconds = int(whole) * 1_000_000_000 + int((fraction + "000000000")[:9] or 0)
    return -nanoseconds if negative else nanoseconds


def apply_pax(header: TarHeader, records: dict[str, bytes]) -> None:
    """Overrides header fields with PAX records (POSIX: the records win)."""
    for key, value in records.items():
        if key == "path":
            header.name = os.fsdecode(value)
        elif key == "linkpath":
            header.linkname = os.fsdecode(value)
        elif key == "size":
            header.size = parse_decimal(value, "size")
        elif key == "uid":
            header.uid = parse_decimal(value, "uid")
        elif key == "gid":
            header.gid = parse_decimal(value, "gid")
        elif key == "uname":
            header.uname = value.decode("utf-8", "replace")
        elif key == "gname":
            header.gname = value.decode("utf-8", "replace")
        elif key == "mtime":
            header.mtime_ns = parse_pax_time(value, "mtime")
        elif key == "atime":
            header.atime_ns = parse_pax_time(value, "atime")
        elif key.startswith("SCHILY.xattr."):
            header.xattrs[key[len("SCHILY.xattr."):]] = value
        elif key == "GNU.sparse.realsize" or key == "GNU.sparse.size":
            header.realsize = parse_decimal(value, key)
        elif key == "GNU.sparse.name":
            header.name = os.fsdecode(value)
        elif key == "GNU.sparse.major":
            if value != b"1":
                raise TarFormatError("only GNU sparse format 1.0 is supported (tar --sparse "
                                     "--format=posix writes it)")
            header.sparse = []  # the map is at the start of the data


MAX_DECIMAL_DIGITS = 20  # a sparse offset or length fits in 64 bits


class SparseMapParser:
    """GNU sparse 1.0 keeps its map at the start of the member's data, padded to a block:
    decimal numbers, one per line, the count first, then offset and length pairs. Fed one
    block at a time, each byte is parsed once; a map longer than `limit` bytes is refused."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0  # bytes fed: the map with its padding, once complete
        self.segments: list[tuple[int, int]] = []
        self._count: int | None = None
        self._offset: int | None = None
        self._partial = b""

    def feed(self, block: bytes) -> bool:
        """Takes the next block of the member's data; True once the map is complete."""
        self.used += len(block)
        lines = (self._partial + block).split(b"\n")
        self._partial = lines.pop()
        for line in lines:
            if self._take(line):
                return True
        if len(self._partial) > MAX_DECIMAL_DIGITS:
            raise TarFormatError("unreadable GNU sparse 1.0 map")
        if self.used >= self.limit:
            raise TarFormatError(f"a GNU sparse 1.0 map longer than {self.limit} bytes")
        return False

    def _take(self, line: bytes) -> bool:
        if not line.isdigit() or len(line) > MAX_DECIMAL_DIGITS:
            raise TarFormatError("unreadable GNU sparse 1.0 map")
        number = int(line)
        if self._count is None:
            # each segment takes at least 4 bytes ("0\n0\n"): refuse a count that cannot fit
            if number > (self.limit - len(line) - 1) // 4:
                raise TarFormatError(f"a GNU sparse 1.0 map of {number} segments is longer "
                                     f"than {self.limit} bytes")
            self._count = number
        elif self._offset is None:
            self._offset = number
        else:
            self.segments.append((self._offset, number))
            self._offset = None
        return len(self.segments) == self._count and self._offset is None


# ---- writing --------------------------------------------------------------------------------


def _pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode("utf-8", "surrogateescape") + b"=" + value + b"\n"
    length = len(body) + 1
    while len(str(length)) + len(body) != length:
        length = len(str(length)) + len(body)
    return str(length).encode() + body


def _split_ustar_name(name: bytes) -> tuple[bytes, bytes] | None:
    """(prefix, name) for a ustar header, or None when only PAX can carry it."""
    if len(name) <= 100:
        return b"", name
    cut = name.rfind(b"/", 0, 156)
    while cut > 0:
        if len(name) - cut - 1 <= 100:
            return name[:cut], name[cut + 1:]
        cut = name.rfind(b"/", 0, cut)
    return None


_OCTAL_LIMITS = {8: 8**7, 12: 8**11}


def _field(value: int, width: int) -> bytes:
    return b"%0*o\0" % (width - 1, value)


def build_header(header: TarHeader) -> bytes:
    """The blocks of one member's header: a PAX header first when ustar cannot hold it."""
    pax: list[bytes] = []
    name = os.fsencode(header.name)
    split = _split_ustar_name(name) if name.isascii() else None
    if split is None:
        pax.append(_pax_record("path", name))
        split = (b"", name[:100])
    linkname = os.fsencode(header.linkname)
    if len(linkname) > 100 or not linkname.isascii():
        pax.append(_pax_record("linkpath", linkname))
        linkname = linkname[:100]
    uid, gid, size = header.uid, header.gid, header.size
    if not 0 <= uid < _OCTAL_LIMITS[8]:
        pax.append(_pax_record("uid", str(uid).encode()))
        uid = 0
    if not 0 <= gid < _OCTAL_LIMITS[8]:
        pax.append(_pax_record("gid", str(gid).encode()))
        gid = 0
    if not 0 <= size < _OCTAL_LIMITS[12]:
        pax.append(_pax_record("size", str(size).encode()))
        size = 0
    mtime = header.mtime_ns // 1_000_000_000
    if not 0 <= mtime < _OCTAL_LIMITS[12]:
        pax.append(_pax_record("mtime", str(mtime).encode()))
        mtime = 0
    for key in sorted(header.xattrs):
        pax.append(_pax_record(f"SCHILY.xattr.{key}", header.xattrs[key]))
    prefix, short = split
    block = b"".join((
        short.ljust(100, b"\0"),
        _field(header.mode & 0o7777, 8), _field(uid, 8), _field(gid, 8),
        _field(size, 12), _field(mtime, 12),
        b"        ",
        header.typeflag,
        linkname.ljust(100, b"\0"),
        b"ustar\x0000",
        header.uname.encode()[:31].ljust(32, b"\0"),
        header.gname.encode()[:31].ljust(32, b"\0"),
        _field(header.devmajor, 8), _field(header.devminor, 8),
        prefix.ljust(155, b"\0"),
        bytes(12),
    ))
    block = block[:148] + b"%06o\0 " % sum(block) + block[156:]
    if not pax:
        return block
    records = b"".join(pax)
    pax_header = TarHeader(name="PaxHeader", typeflag=PAX_LOCAL, size=len(records))
    return build_header(pax_header) + records + padding(len(records)) + block


def padding(size: int) -> bytes:
    return bytes(-size % BLOCK)
