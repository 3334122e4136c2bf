"""Content digests: streams that hash what passes through them, and OCI chain ids."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Sequence
from typing import Any, BinaryIO, cast

from aufs.errors import AufsError


class DigestMismatchError(AufsError):
    """Content does not match the digest its manifest or config promised."""


class CorruptBlobError(DigestMismatchError):
    """A layer blob does not match its digests, or cannot be decompressed or unpacked. The
    message is one line: the blob's digest, what is wrong, and what to do."""


def parse_digest(digest: str) -> str:
    """The hex part of a sha256 digest; anything else is refused."""
    algorithm, _, hex_part = digest.partition(":")
    if algorithm != "sha256" or len(hex_part) != 64 or hex_part.strip("0123456789abcdef"):
        raise DigestMismatchError(f"unsupported or malformed digest {digest!r}")
    return hex_part


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """OCI chain ids as hex: ChainID(L0) = DiffID(L0), ChainID(Ln) = sha256 of
    "ChainID(Ln-1) DiffID(Ln)". They name layers in the store, so images share bases."""
    chain: list[str] = []
    for diff_id in diff_ids:
        parse_digest(diff_id)
        if not chain:
            chain.append(diff_id)
        else:
            chain.append("sha256:" + hashlib.sha256(f"{chain[-1]} {diff_id}".encode()).hexdigest())
    return [parse_digest(item) for item in chain]


class HashingReader(io.RawIOBase):
    """Reads through to `source`, hashing every byte and counting them."""

    def __init__(self, source: BinaryIO, on_bytes: Callable[[int], None] | None = None
                 ) -> None:
        super().__init__()
        self.source = source
        self.hash = hashlib.sha256()
        self.count = 0
        self._on_bytes = on_bytes

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        count = self.source.readinto(buffer)  # type: ignore[attr-defined]
        if count:
            self.hash.update(buffer[:count])
            self.count += count
            if self._on_bytes is not None:
                self._on_bytes(count)
        return count or 0

    def drain(self) -> None:
        """Reads what is left, so the digest covers the whole stream."""
        buffer = bytearray(1 << 20)
        while self.readinto(memoryview(buffer)):
            pass

    def verify(self, digest: str, what: str) -> None:
        verify_digest(self.hash, digest, what)


def verify_digest(hash_object: Any, digest: str, what: str) -> None:
    """Raises DigestMismatchError unless the finished hash equals the promised digest."""
    if hash_object.hexdigest() != parse_digest(digest):
        raise DigestMismatchError(
            f"{what}: content is sha256:{hash_object.hexdigest()} but {digest} was promised; "
            "the source is corrupt or was tampered with"
        )


def buffered(raw: io.RawIOBase) -> BinaryIO:
    """A raw stream with a 1 MiB buffer in front, typed as the binary stream it is."""
    return cast(BinaryIO, io.BufferedReader(raw, 1 << 20))
