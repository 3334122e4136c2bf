"""Tar headers: building and parsing agree with each other and with the standard library,
and the native parser gives exactly the fallback's result or the fallback's error."""

from __future__ import annotations

import io
import tarfile

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aufs import _fallback
from aufs.archive.format import REGULAR, TarFormatError, TarHeader, build_header, parse_header
from conftest import NATIVE

headers = st.builds(
    TarHeader,
    name=st.text(alphabet=st.sampled_from("ab/é.-_x"), min_size=1, max_size=300).filter(
        lambda n: n.strip("/") and not n.endswith("/")),
    typeflag=st.sampled_from([b"0", b"2", b"3", b"5", b"6"]),
    mode=st.integers(0, 0o7777),
    uid=st.integers(0, 2**32),
    gid=st.integers(0, 2**32),
    size=st.integers(0, 2**40),
    mtime_ns=st.integers(0, 2**34).map(lambda seconds: seconds * 1_000_000_000),
    linkname=st.text(alphabet=st.sampled_from("cd/"), max_size=150),
    devmajor=st.integers(0, 4095),
    devminor=st.integers(0, 4095),
)


@settings(max_examples=300)
@given(header=headers)
def test_build_then_parse_and_tarfile_agree(header: TarHeader) -> None:
    header.size = 0  # no data follows, so the bytes are a whole archive
    raw = build_header(header)
    parsed = parse_header(raw[-512:])
    assert (parsed.typeflag, parsed.mode) == (header.typeflag, header.mode)
    with tarfile.open(fileobj=io.BytesIO(raw + bytes(1024)), mode="r:") as tar:
        (member,) = tar.getmembers()
    assert member.name == header.name
    assert (member.mode, member.uid, member.gid) == (header.mode, header.uid, header.gid)
    assert member.mtime == header.mtime_ns // 1_000_000_000
    if header.typeflag in (b"3",):
        assert (member.devmajor, member.devminor) == (header.devmajor, header.devminor)


blocks = st.one_of(
    headers.map(lambda h: build_header(h)[-512:]),
    st.binary(min_size=512, max_size=512),
    headers.map(lambda h: build_header(h)[-512:]).flatmap(
        lambda b: st.tuples(st.integers(0, 511), st.integers(0, 255)).map(
            lambda edit: b[:edit[0]] + bytes([edit[1]]) + b[edit[0] + 1:])),
)


def outcome(function: object, block: bytes) -> object:
    try:
        return function(block)  # type: ignore[operator]
    except ValueError as error:
        return ("error", str(error))


@pytest.mark.skipif(NATIVE is None, reason="the native extension was not built")
@settings(max_examples=1000)
@given(block=blocks)
def test_native_header_parser_matches_the_fallback(block: bytes) -> None:
    assert NATIVE is not None
    assert outcome(NATIVE.parse_tar_header, block) == outcome(_fallback.parse_tar_header, block)


@pytest.mark.parametrize("field", [b"0000644\0", b" 644 \0\0\0", b"\x80\0\0\0\0\0\x01\xa4"])
def test_number_forms(field: bytes) -> None:
    assert _fallback.parse_tar_number(field, "mode") == 0o644


@pytest.mark.parametrize("field", [b"0o644\0\0\0", b"6_44\0\0\0\0", b"+644\0\0\0\0", b"0000648\0",
                                   b"\x81\0\0\0\0\0\0\0"])
def test_lenient_numbers_are_refused(field: bytes) -> None:
    with pytest.raises(ValueError, match="mode"):
        _fallback.parse_tar_number(field, "mode")


def test_checksum_mismatch_is_a_format_error() -> None:
    raw = bytearray(build_header(TarHeader(name="a", typeflag=REGULAR)))
    raw[0] ^= 1
    with pytest.raises(TarFormatError, match="checksum"):
        parse_header(bytes(raw))
