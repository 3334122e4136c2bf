"""User-namespace id maps: (container_id, host_id, size) ranges, as Docker's idtools keeps them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class IDRange:
    container_id: int
    host_id: int
    size: int


@dataclass(frozen=True)
class IDMap:
    """One direction-agnostic map; an empty map is the identity."""

    ranges: tuple[IDRange, ...] = ()

    @classmethod
    def from_triples(cls, triples: Iterable[Sequence[int]] | None) -> IDMap:
        ranges = []
        for triple in triples or ():
            if len(triple) != 3:
                raise ValueError(
                    f"an id map entry is (container_id, host_id, size), not {triple!r}")
            container_id, host_id, size = (int(value) for value in triple)
            if container_id < 0 or host_id < 0 or size <= 0:
                raise ValueError(f"id map entry {tuple(triple)!r} has a negative id or no size")
            if max(container_id, host_id) + size > 2**32 - 1:
                raise ValueError(f"id map entry {tuple(triple)!r} passes the largest id")
            ranges.append(IDRange(container_id, host_id, size))
        return cls(tuple(ranges))

    def to_host(self, container_id: int) -> int:
        if not self.ranges:
            return container_id
        for entry in self.ranges:
            if entry.container_id <= container_id < entry.container_id + entry.size:
                return entry.host_id + container_id - entry.container_id
        raise ValueError(f"container id {container_id} is not mapped to any host id")

    def to_container(self, host_id: int) -> int:
        if not self.ranges:
            return host_id
        for entry in self.ranges:
            if entry.host_id <= host_id < entry.host_id + entry.size:
                return entry.container_id + host_id - entry.host_id
        raise ValueError(f"host id {host_id} is not mapped to any container id")


@dataclass(frozen=True)
class IdentityMapping:
    """The uid and gid maps of a store."""

    uids: IDMap = IDMap()
    gids: IDMap = IDMap()

    @property
    def root_pair(self) -> tuple[int, int]:
        """The host (uid, gid) that container root maps to: the owner of layer dirs."""
        return self.uids.to_host(0), self.gids.to_host(0)

    @property
    def is_identity(self) -> bool:
        return not self.uids.ranges and not self.gids.ranges
