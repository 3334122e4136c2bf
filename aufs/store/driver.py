"""aufs.Driver: Docker's AUFS layer store, with the lifecycle of its graphdriver.

Policy lives here: ids, reference counts, locks, the unmount retries and the order of every
change on disk. The layout is in store.py, the union mounts in backends/.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from aufs import _implementation as native
from aufs.archive.changes import Change
from aufs.archive.idmap import IdentityMapping, IDMap
from aufs.errors import (
    AufsError,
    LayerExistsError,
    LayerInUseError,
    LayerNotFoundError,
    MountError,
    UnbalancedPutError,
    UnmountBusyError,
)
from aufs.fsmagic import backing_fs_name
from aufs.ids import validate_layer_id
from aufs.store.atomic import atomic_remove
from aufs.store.backends import Backend, MountRequest, resolve_backend
from aufs.store.diffs import FileGetter, LayerDiffs
from aufs.store.layout import MountChain, Store
from aufs.store.locking import LayerReferences, RootLock, StoreLocks
from aufs.store.migrate import MigrationError, migration_in_progress
from aufs.store.mounters import MNT_DETACH, Mounter
from aufs.store.retry import RetryPolicy, unmount_with_retries

log = logging.getLogger(__name__)


def raise_open_file_limit() -> int:
    """Lifts the soft limit on open files to the hard one, as Go's runtime does for dockerd
    since Go 1.19: a tree walk keeps a directory fd or two per level, and a layer may nest
    thousands of levels deep (a 1,000-level path is a valid archive) while Python starts
    with Linux's 1,024. Returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            return wanted
    return soft


IDTriples = Iterable[Sequence[int]]


@dataclass(frozen=True)
class CreateOpts:
    """Docker's CreateOpts. storage_opt is refused, as Docker's aufs driver refused it."""

    mount_label: str = ""
    storage_opt: Mapping[str, str] = field(default_factory=dict)


class Driver:
    """A store of layers at `root`, union-mounted through `backend`.

    backend is "auto", "aufs", "overlay", "fuse-overlayfs" or a Backend instance (for example
    an AufsBackend over a RecordingMounter). Use it as a context manager to clean up mounts.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        options: Sequence[str] = (),
        uid_maps: IDTriples | None = None,
        gid_maps: IDTriples | None = None,
        backend: str | Backend = "auto",
        *,
        retry_policy: RetryPolicy | None = None,
        mounter: Mounter | None = None,
    ) -> None:
        if options:
            raise ValueError(f"unknown driver options {list(options)!r}: this driver takes none")
        raise_open_file_limit()
        self.root = os.path.abspath(os.fspath(root))
        bad = sorted(set(self.root) & set(":,="))
        if bad:
            raise ValueError(
                f"store root {self.root!r} holds {', '.join(map(repr, bad))}, which union mount "
                "options cannot carry; choose a path without them"
            )
        self._id_mapping = IdentityMapping(IDMap.from_triples(uid_maps),
                                           IDMap.from_triples(gid_maps))
        self.retry_policy = retry_policy or RetryPolicy()
        self._store = Store(self.root)
        heading = migration_in_progress(self._store)
        if heading is not None:
            raise MigrationError(f"{self.root} is half way through a migration to {heading} "
                                 f"whiteouts; finish it with `aufs migrate --to {heading}`")

        store_format = None if self._store.is_new() else (self._store.read_format() or "aufs")
        self._backend, magic = resolve_backend(backend, self.root, store_format, mounter)
        self.backing_fs = backing_fs_name(magic)

        root_uid, root_gid = self.id_mapping.root_pair
        self._store.ensure_layout((os.getuid(), root_gid))
        self._layer_owner = (root_uid, root_gid)
        if store_format is None:
            store_format = self._backend.whiteout_format
            self._store.write_format(store_format)
        self.whiteout_format: str = store_format

        self._locks = StoreLocks(RootLock(self._store.layers_dir))
        with self._locks.root.hold():
            self._store.clean_stale()
        self._mount_requests: dict[str, tuple[MountChain, str, MountRequest]] = {}
        self._diffs = LayerDiffs(self._store, self._backend, self._locks, get=self.get,
                                 put=self.put, whiteout_format=store_format,
                                 id_mapping=self.id_mapping,
                                 retry_policy=self.retry_policy)

    # ---- identity -------------------------------------------------------------------------

    def __str__(self) -> str:
        return "aufs"

    def __repr__(self) -> str:
        return f"aufs.Driver({self.root!r}, backend={self.backend!r})"

    @property
    def backend(self) -> str:
        """What "auto" resolved to: "aufs", "overlay" or "fuse-overlayfs"."""
        return self._backend.name

    @property
    def store(self) -> Store:
        return self._store

    @property
    def id_mapping(self) -> IdentityMapping:
        """How owners map between the host and the layers' archives (uid_maps, gid_maps)."""
        return self._id_mapping

    @id_mapping.setter
    def id_mapping(self, mapping: IdentityMapping) -> None:
        self._id_mapping = mapping
        self._diffs.id_mapping = mapping

    # ---- metadata -------------------------------------------------------------------------

    def exists(self, layer_id: str) -> bool:
        return self._store.exists(validate_layer_id(layer_id))

    def parent_ids(self, layer_id: str) -> list[str]:
        """The layer's ancestors, direct parent first."""
        return self._store.parent_ids(validate_layer_id(layer_id))

    def layer_ids(self) -> list[str]:
        return self._store.ids()

    def is_mounted(self, layer_id: str) -> bool:
        """Whether the layer's union mount (mnt/<id>) is mounted now, by anyone."""
        return self._backend.is_mounted(self._store.mount_path(validate_layer_id(layer_id)))

    def status(self) -> list[tuple[str, str]]:
        """Docker's four rows, in Docker's order, then this driver's own."""
        return [
            ("Root Dir", self.root),
            ("Backing Filesystem", self.backing_fs),
            ("Dirs", str(len(self._store.ids()))),
            ("Dirperm1 Supported", "true" if self._backend.dirperm1_supported() else "false"),
            ("Backend", self.backend),
            ("Whiteout Format", self.whiteout_format),
            ("Implementation", native.IMPLEMENTATION),
            ("Layers Held", str(len(self._locks.references.held()))),
        ]

    def get_metadata(self, layer_id: str) -> dict[str, str]:
        """Where the layer lives, with overlay2's key names (as `docker inspect` shows)."""
        layer_id = validate_layer_id(layer_id)
        parents = self._store.parent_ids(layer_id)
        metadata = {
            "UpperDir": self._store.diff_path(layer_id),
            "MergedDir": self._path_for(layer_id, parents),
            "LowerDir": ":".join(self._store.diff_path(parent) for parent in parents),
        }
        if self._backend.needs_work_dir:
            metadata["WorkDir"] = self._store.work_path(layer_id)
        return metadata

    # ---- create and remove ----------------------------------------------------------------

    def create(self, layer_id: str, parent: str = "", opts: CreateOpts | None = None) -> None:
        """Creates an empty layer on top of parent. Nothing is left behind if it fails."""
        layer_id = validate_layer_id(layer_id)
        parent = validate_layer_id(parent, "parent id") if parent else ""
        if opts is not None and opts.storage_opt:
            raise AufsError("--storage-opt is not supported for aufs")
        with self._locks.ids.hold(layer_id), self._locks.root.hold():
            if self._store.exists(layer_id):
                raise LayerExistsError(f"layer {layer_id!r} already exists in {self.root}")
            parents = [parent, *self._store.parent_ids(parent)] if parent else []
            try:
                self._store.remove_record(layer_id)  # a crashed remove's: not this layer's
                self._store.make_layer_dirs(layer_id, self._layer_owner,
                                            work=self._backend.needs_work_dir)
                self._store.write_layer_file(layer_id, parents)
            except BaseException:
                with contextlib.suppress(OSError):
                    self._store.remove_layer_dirs(layer_id)
                raise

    def create_read_write(self, layer_id: str, parent: str = "",
                          opts: CreateOpts | None = None) -> None:
        """Same as create: aufs makes no difference between image and container layers."""
        self.create(layer_id, parent, opts)

    def remove(self, layer_id: str, force: bool = False) -> None:
        """Unmounts and deletes a layer. A mount still busy after the retries raises
        UnmountBusyError and keeps the layer; force=True detaches it lazily instead."""
        layer_id = validate_layer_id(layer_id)
        with self._locks.ids.hold(layer_id), self._locks.root.hold():
            leftovers = [path for path in (self._store.diff_path(layer_id),
                                           self._store.mount_path(layer_id))
                         if os.path.lexists(path)]
            if not self._store.exists(layer_id) and not leftovers:
                raise LayerNotFoundError(f"layer {layer_id!r} does not exist in {self.root}")
            children = self._store.children(layer_id)
            if children:
                raise LayerInUseError(
                    f"layer {layer_id!r} is the parent of {', '.join(sorted(children))}; "
                    "remove those first"
                )
            # Docker removes a layer this process still holds; other processes' holds count.
            held = self._locks.references.count(layer_id)
            self._locks.references.forget(layer_id)
            try:
                if LayerReferences.changing(self._store.layer_file(layer_id)):
                    raise LayerInUseError(f"layer {layer_id!r} is being changed (an apply is "
                                          "under way); retry when it is done")
                if (not force and not self._backend.is_mounted(self._store.mount_path(layer_id))
                        and LayerReferences.held_elsewhere(self._store.diff_path(layer_id))):
                    raise LayerInUseError(
                        f"layer {layer_id!r} is in use by another process (or an apply or diff "
                        "under way); put it there first, or remove with force=True")
                self._unmount_layer(layer_id, force=force, refuse_if_shared=True)
            except BaseException:
                self._locks.references.restore(layer_id, self._store.diff_path(layer_id), held)
                raise
            self._store.remove_record(layer_id)
            self._store.remove_layer_file(layer_id)
            self._store.remove_layer_dirs(layer_id)
            self._mount_requests.pop(layer_id, None)

    def rename(self, layer_id: str, new_id: str) -> None:
        """Renames a leaf layer that nothing holds. Import and pull fill a layer under a
        temporary id and rename it when it is whole, so that a crash never leaves a layer
        with part of its content under its real id."""
        layer_id = validate_layer_id(layer_id)
        new_id = validate_layer_id(new_id, "new layer id")
        first, second = sorted((layer_id, new_id))
        with self._locks.ids.hold(first), self._locks.ids.hold(second), self._locks.root.hold():
            store = self._store
            parents = store.parent_ids(layer_id)
            if store.exists(new_id):
                raise LayerExistsError(f"layer {new_id!r} already exists in {self.root}")
            if store.children(layer_id):
                raise LayerInUseError(f"layer {layer_id!r} has children: it cannot be renamed")
            if (self._locks.references.count(layer_id) or self.is_mounted(layer_id)
                    or LayerReferences.held_elsewhere(store.diff_path(layer_id))
                    or LayerReferences.changing(store.layer_file(layer_id))):
                raise LayerInUseError(f"layer {layer_id!r} is in use; put it first")
            for old, new in ((store.diff_path(layer_id), store.diff_path(new_id)),
                             (store.mount_path(layer_id), store.mount_path(new_id)),
                             (store.work_path(layer_id), store.work_path(new_id))):
                if os.path.lexists(new):  # left by an interrupted create: not a layer
                    atomic_remove(new)
                if os.path.lexists(old):
                    os.rename(old, new)
            store.rename_record(layer_id, new_id)
            store.write_layer_file(new_id, parents)  # the commit point
            store.remove_layer_file(layer_id)
            store.remove_short_link(layer_id)
            self._mount_requests.pop(layer_id, None)

    # ---- get and put ----------------------------------------------------------------------

    def get(self, layer_id: str, mount_label: str = "") -> str:
        """The path of the layer's root filesystem: diff/<id> for a base layer, the union
        mount mnt/<id> for a child. Each get needs one put."""
        layer_id = validate_layer_id(layer_id)
        with self._locks.ids.hold(layer_id):
            if self._locks.references.count(layer_id) > 0:
                parents = self._store.parent_ids(layer_id)
                path = self._path_for(layer_id, parents)
                if not parents or self._backend.is_mounted(path):
                    self._acquire(layer_id)
                    return path
            with self._locks.root.hold():
                # read under the root lock: another process may have removed or replaced it
                chain = self._store.mount_chain(layer_id,
                                                short_links=self._backend.uses_short_links)
                path = self._path_for(layer_id, chain.parents)
                self._acquire(layer_id)
                try:
                    if chain.parents and not self._backend.is_mounted(path):
                        if self._backend.needs_work_dir:
                            self._store.ensure_work_dir(layer_id, self._layer_owner)
                        self._mount(layer_id, mount_label, chain)
                except BaseException:
                    self._locks.references.release(layer_id)
                    raise
            return path

    def put(self, layer_id: str) -> None:
        """Releases one get. The last one unmounts, unless another process still holds the
        layer. A mount that stays busy raises UnmountBusyError and stays held."""
        layer_id = validate_layer_id(layer_id)
        with self._locks.ids.hold(layer_id):
            count = self._locks.references.count(layer_id)
            try:
                parents = self._store.parent_ids(layer_id)
            except LayerNotFoundError:
                self._locks.references.forget(layer_id)  # it went away: let go of what we held
                raise
            if count > 1:
                self._locks.references.release(layer_id)
                return
            with self._locks.root.hold():
                if count == 0:
                    # Docker's "Put without Get": release a mount that a previous process left.
                    if parents and self._backend.is_mounted(self._store.mount_path(layer_id)):
                        self._unmount_layer(layer_id, force=False, refuse_if_shared=False)
                        return
                    raise UnbalancedPutError(
                        f"put({layer_id!r}) without a matching get: this process holds no "
                        "reference to the layer and it is not mounted"
                    )
                self._locks.references.release(layer_id)
                try:
                    # a child's get mounted it (or found it mounted) and our reference kept
                    # other processes' cleanup and remove off it: no need to ask the kernel
                    self._unmount_layer(layer_id, force=False, refuse_if_shared=False,
                                        surely_mounted=bool(parents))
                except UnmountBusyError:
                    self._locks.references.acquire(layer_id, self._store.diff_path(layer_id))
                    raise

    @contextlib.contextmanager
    def mounted(self, layer_id: str, mount_label: str = "") -> Iterator[str]:
        """`with driver.mounted(id) as path:` gets the layer, and puts it on exit."""
        path = self.get(layer_id, mount_label)
        try:
            yield path
        finally:
            self.put(layer_id)

    # ---- diffs (aufs/layerdiffs.py) --------------------------------------------------------

    def diff(self, layer_id: str, parent: str = "") -> BinaryIO:
        """The layer as an uncompressed tar in AUFS whiteout format. Close it when done."""
        return self._diffs.diff(layer_id, parent)

    def diff_size(self, layer_id: str, parent: str = "") -> int:
        return self._diffs.diff_size(layer_id, parent)

    def apply_diff(self, layer_id: str, parent: str, stream: BinaryIO, *,
                   allow_devices: bool = True, record: bool | str = False) -> int:
        """Unpacks an uncompressed, untrusted tar into the layer, atomically. record=True
        (or the stream's diff_id, when the caller checks it) keeps the tar's tar-split, so
        that diff(layer_id, parent) gives back this very tar."""
        return self._diffs.apply_diff(layer_id, parent, stream, allow_devices=allow_devices,
                                      record=record)

    @property
    def reproduces_exact_diffs(self) -> bool:
        """Docker's Capabilities().ReproducesExactDiffs: a layer applied with record gives
        back its original tar, byte for byte, while its files are unchanged."""
        return True

    def verified_diff_id(self, layer_id: str) -> str | None:
        """The recorded diff_id of the layer's diff against its parent, when the files on
        disk still rebuild it; None when it has no record or changed."""
        return self._diffs.verified_diff_id(layer_id)

    def changes(self, layer_id: str, parent: str = "") -> list[Change]:
        return self._diffs.changes(layer_id, parent)

    def diff_getter(self, layer_id: str) -> FileGetter:
        return self._diffs.diff_getter(layer_id)

    # ---- cleanup --------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Unmounts every layer mount under mnt/ that no other process holds. It always
        finishes: a mount that stays busy is detached lazily."""
        with self._locks.root.hold():
            try:
                names = sorted(os.listdir(self._store.mnt_dir))
            except FileNotFoundError:
                names = []
            for name in names:
                target = self._store.mount_path(name)
                if not self._backend.is_mounted(target):
                    continue
                self._locks.references.forget(name)
                if LayerReferences.held_elsewhere(self._store.diff_path(name)):
                    log.info("cleanup: leaving %s mounted, another process holds it", target)
                    continue
                try:
                    self._backend.before_unmount(target)
                    unmount_with_retries(self._backend.unmount, target, self.retry_policy,
                                         force=True)
                except (AufsError, OSError) as error:
                    log.warning("cleanup: cannot unmount %s: %s", target, error)
            self._locks.references.forget_all()
        self._locks.root.close()

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.cleanup()

    # ---- internals ------------------------------------------------------------------------

    def _acquire(self, layer_id: str) -> None:
        try:
            self._locks.references.acquire(layer_id, self._store.diff_path(layer_id))
        except FileNotFoundError:
            raise LayerNotFoundError(f"layer {layer_id!r} lost its content ({self.root}/diff/"
                                     f"{layer_id} is missing); see `aufs fsck`") from None

    def _path_for(self, layer_id: str, parents: Sequence[str]) -> str:
        if parents:
            return self._store.mount_path(layer_id)
        return self._store.diff_path(layer_id)

    def _mount(self, layer_id: str, label: str, chain: MountChain) -> None:
        try:
            self._backend.mount(self._mount_request(layer_id, label, chain))
        except MountError as error:
            if error.errno != errno.ENOENT:
                raise
            # a short link (or the work dir) went missing under the cache, removed by hand
            # say: check every link of the chain again, once
            self._store.forget_chain(layer_id)
            if self._backend.needs_work_dir:
                self._store.ensure_work_dir(layer_id, self._layer_owner)
            chain = self._store.mount_chain(layer_id, short_links=self._backend.uses_short_links)
            self._backend.mount(self._mount_request(layer_id, label, chain))

    def _mount_request(self, layer_id: str, label: str, chain: MountChain) -> MountRequest:
        cached = self._mount_requests.get(layer_id)
        if cached is not None and cached[0] is chain and cached[1] == label:
            return cached[2]  # the store hands out a new chain whenever the layer changed
        store = self._store
        request = MountRequest(
            layer_id=layer_id,
            upper=store.diff_path(layer_id),
            lowers=chain.lowers,
            target=store.mount_path(layer_id),
            work=store.work_path(layer_id) if self._backend.needs_work_dir else None,
            label=label,
            root=store.root if chain.short_lowerdir is not None else None,
            short_lowerdir=chain.short_lowerdir,
            short_lowerdir_absolute=chain.short_lowerdir_absolute,
        )
        self._mount_requests[layer_id] = (chain, label, request)
        return request

    def _unmount_layer(self, layer_id: str, *, force: bool, refuse_if_shared: bool,
                       surely_mounted: bool = False) -> None:
        """Unmounts mnt/<id> if it is mounted, with the retry policy. Call with the root lock
        held and this process's own references already released. When another process
        holds the layer: force detaches lazily, refuse_if_shared raises, else it is kept.
        surely_mounted skips the mount test (umount2 still finds nothing mounted, if someone
        unmounted it by hand meanwhile)."""
        target = self._store.mount_path(layer_id)
        if not surely_mounted and not self._backend.is_mounted(target):
            return
        if LayerReferences.held_elsewhere(self._store.diff_path(layer_id)):
            if force:
                log.warning("%s is held by another process; detaching it lazily", target)
                self._backend.unmount(target, MNT_DETACH)
            elif refuse_if_shared:
                raise LayerInUseError(
                    f"{target} is in use by another process; put it there first, or remove "
                    "with force=True"
                )
            return
        self._backend.before_unmount(target)
        unmount_with_retries(self._backend.unmount, target, self.retry_policy, force=force)
