"""The diff half of the driver: diff, diff_size, apply_diff, changes and diff_getter, each
with Docker's fast path (the direct parent) and naive path (any other parent).

It works on a store, a backend and the store's locks, and mounts layers through the get and
put it is given; it never sees the Driver itself."""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
from collections.abc import Callable
from typing import BinaryIO

from aufs import _implementation as native
from aufs.archive.beneath import RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS
from aufs.archive.changes import Change, ChangeKind, changes_size, layered_changes, tree_changes
from aufs.archive.export import ExportOptions, TarPipe, write_entries, write_tree
from aufs.archive.extract import ExtractOptions, WhiteoutMode, extract
from aufs.archive.idmap import IdentityMapping
from aufs.archive.staging import clone_tree, exchange
from aufs.archive.tarsplit import TarSplitError, TarSplitRecorder, read_entries, replay
from aufs.errors import (
    AufsError,
    DiffError,
    LayerInUseError,
    LayerNotFoundError,
    MountError,
    UnmountBusyError,
)
from aufs.ids import validate_layer_id
from aufs.store.atomic import remove_tree
from aufs.store.backends import Backend, MountRequest
from aufs.store.layout import CorruptStoreError, Store, TarSplitRecord
from aufs.store.locking import LayerReferences, StoreLocks
from aufs.store.mounters import MNT_DETACH
from aufs.store.retry import RetryPolicy, unmount_with_retries

log = logging.getLogger(__name__)

# a layer's own top-level aufs bookkeeping, which Diff leaves out too
AUFS_METADATA = frozenset({".wh..wh.aufs", ".wh..wh.plnk", ".wh..wh.orph"})


class FileGetter:
    """Opens files of one layer's branch by their archive name, never outside it (tar-split
    rebuilds a layer's original tar from these). Close it, or use it as a context manager."""

    def __init__(self, root: str) -> None:
        self.root = root
        self._fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def get(self, name: str) -> BinaryIO:
        fd = native.openat2(self._fd, name.lstrip("/"), os.O_RDONLY | os.O_CLOEXEC, 0,
                            RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
        return os.fdopen(fd, "rb")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> FileGetter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class LayerDiffs:
    """Diff operations over one store. get and put are the driver's: the naive path mounts
    layers through them, so their references count as any other user's."""

    def __init__(self, store: Store, backend: Backend, locks: StoreLocks, *,
                 get: Callable[[str], str], put: Callable[[str], None],
                 whiteout_format: str, id_mapping: IdentityMapping,
                 retry_policy: RetryPolicy | None = None) -> None:
        self.store = store
        self.backend = backend
        self.locks = locks
        self.get = get
        self.put = put
        self.whiteout_format = whiteout_format
        self.id_mapping = id_mapping
        self.retry_policy = retry_policy or RetryPolicy()

    # ---- which path ----------------------------------------------------------------------

    def is_parent(self, layer_id: str, parent: str) -> bool:
        """Docker's isParent: the fast path serves a base layer for any parent, and a child
        only for its direct parent."""
        try:
            parents = self.store.parent_ids(layer_id)
        except AufsError:
            parents = []
        if not parent and parents:
            return False
        return not (parents and parent != parents[0])

    def _check(self, layer_id: str, parent: str) -> tuple[str, str]:
        layer_id = validate_layer_id(layer_id)
        parent = validate_layer_id(parent, "parent id") if parent else ""
        if not self.store.exists(layer_id):
            raise LayerNotFoundError(f"layer {layer_id!r} does not exist in {self.store.root}")
        if parent and not self.store.exists(parent):
            raise LayerNotFoundError(f"parent {parent!r} does not exist in {self.store.root}")
        return layer_id, parent

    def _export_options(self) -> ExportOptions:
        return ExportOptions(id_mapping=self.id_mapping)

    # ---- changes and sizes ---------------------------------------------------------------

    def changes(self, layer_id: str, parent: str = "") -> list[Change]:
        layer_id, parent = self._check(layer_id, parent)
        if self.is_parent(layer_id, parent):
            parents = self.store.parent_ids(layer_id)
            return layered_changes(self.store.diff_path(layer_id),
                                   [self.store.diff_path(p) for p in parents])
        with self._mounted_pair(layer_id, parent) as (layer_fs, parent_fs):
            return tree_changes(layer_fs, parent_fs)

    def diff_size(self, layer_id: str, parent: str = "") -> int:
        layer_id, parent = self._check(layer_id, parent)
        if self.is_parent(layer_id, parent):
            return native.directory_size(self.store.diff_path(layer_id))
        with self._mounted_pair(layer_id, parent) as (layer_fs, parent_fs):
            return changes_size(layer_fs, tree_changes(layer_fs, parent_fs))

    @contextlib.contextmanager
    def _mounted_pair(self, layer_id: str, parent: str):  # type: ignore[no-untyped-def]
        layer_fs = self.get(layer_id)
        try:
            if not parent:
                yield layer_fs, None
                return
            parent_fs = self.get(parent)
            try:
                yield layer_fs, parent_fs
            finally:
                self.put(parent)
        finally:
            self.put(layer_id)

    # ---- diff ----------------------------------------------------------------------------

    def diff(self, layer_id: str, parent: str = "") -> BinaryIO:
        """An uncompressed tar in AUFS whiteout format; close it when done."""
        layer_id, parent = self._check(layer_id, parent)
        options = self._export_options()
        if self.is_parent(layer_id, parent):
            branch = self.store.diff_path(layer_id)
            with self.locks.root.hold():
                hold = self._hold(layer_id)
            record = self._own_record(layer_id, parent)
            if record is not None:
                return self._stream(
                    lambda out: self._write_recorded(layer_id, branch, record, out, options),
                    on_close=lambda: os.close(hold))
            return self._stream(lambda out: write_tree(branch, out, options),
                                on_close=lambda: os.close(hold))
        layer_fs = self.get(layer_id)
        parent_fs = None
        try:
            parent_fs = self.get(parent) if parent else None
            changes = tree_changes(layer_fs, parent_fs)
        except BaseException:
            if parent_fs is not None:
                self.put(parent)
            self.put(layer_id)
            raise
        if parent:
            self.put(parent)
        entries = [(c.path, c.kind is ChangeKind.DELETE) for c in sorted(changes)]
        return self._stream(lambda out: write_entries(layer_fs, entries, out, options),
                            on_close=lambda: self.put(layer_id))

    # ---- exact diffs (tar-split) -----------------------------------------------------------

    def _own_record(self, layer_id: str, parent: str) -> TarSplitRecord | None:
        """The layer's tar-split record, when the diff asked for is against its own parent."""
        parents = self.store.parent_ids(layer_id)
        if parent != (parents[0] if parents else ""):
            return None
        try:
            return self.store.read_record(layer_id)
        except CorruptStoreError as error:
            log.warning("layer %s: %s; its diff is written afresh", layer_id[:12], error)
            return None

    def verified_diff_id(self, layer_id: str) -> str | None:
        """The diff_id the layer's diff against its parent has, when its tar-split record
        still rebuilds it (files checked on disk); None otherwise."""
        layer_id, _ = self._check(layer_id, "")
        parents = self.store.parent_ids(layer_id)
        record = self._own_record(layer_id, parents[0] if parents else "")
        if record is None:
            return None
        with self.locks.root.hold():
            hold = self._hold(layer_id)
        try:
            self._verify(self.store.diff_path(layer_id), record)
        except (OSError, TarSplitError) as error:
            log.debug("layer %s: %s", layer_id[:12], error)
            return None
        finally:
            os.close(hold)
        return record.diff_id

    def _verify(self, branch: str, record: TarSplitRecord) -> None:
        """Raises TarSplitError unless the record rebuilds exactly its diff_id from branch:
        nothing in branch changed since the record was written (no entry's ctime is later,
        which catches new, removed, rewritten and re-moded entries alike), and each file
        still has the size and CRC-64 the record keeps (a pass at memory speed: the sha256
        of the rebuilt tar is checked as it is written, by whoever writes it)."""
        recorded_at = os.stat(record.tar_split).st_mtime_ns
        if os.stat(branch).st_mtime_ns > recorded_at:
            raise TarSplitError("entries were added to or removed from the layer's top")
        stack = [branch]
        while stack:
            directory = stack.pop()
            with os.scandir(directory) as entries:
                for entry in entries:
                    if directory == branch and entry.name in AUFS_METADATA:
                        continue
                    info = entry.stat(follow_symlinks=False)
                    if info.st_ctime_ns > recorded_at:
                        name = os.path.relpath(entry.path, branch)
                        raise TarSplitError(f"{name!r} changed after the layer was recorded")
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        with gzip.open(record.tar_split, "rb") as journal, FileGetter(branch) as files:
            replay(read_entries(journal), files, check_crc=True,  # type: ignore[arg-type]
                   hashing=False)

    def _write_recorded(self, layer_id: str, branch: str, record: TarSplitRecord, out: int,
                        options: ExportOptions) -> None:
        """The original tar from the record, checked first (a hashing pass over the files,
        which the page cache makes cheap) so that a wrong stream is never begun; a layer
        that changed gets a fresh tar and a warning."""
        try:
            self._verify(branch, record)
        except (OSError, TarSplitError) as error:
            log.warning("layer %s changed since it was applied from its image (%s): its diff "
                        "is a fresh tar, whose digest is not %s", layer_id[:12], error,
                        record.diff_id)
            write_tree(branch, out, options)
            return

        def write(data: bytes | memoryview) -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(out, view):]

        with gzip.open(record.tar_split, "rb") as journal, FileGetter(branch) as files:
            digest = replay(read_entries(journal), files, write)  # type: ignore[arg-type]
        if digest != record.diff_id:  # changed between the check and the copy
            raise DiffError(f"layer {layer_id!r} changed while its diff was written: the tar "
                            f"has {digest}, not {record.diff_id}; try again")

    @staticmethod
    def _stream(produce: Callable[[int], None],
                on_close: Callable[[], None] | None = None) -> BinaryIO:
        return io.BufferedReader(TarPipe(produce, on_close), buffer_size=1 << 16)

    # ---- apply ---------------------------------------------------------------------------

    def apply_diff(self, layer_id: str, parent: str, stream: BinaryIO, *,
                   allow_devices: bool = True, record: bool | str = False) -> int:
        """Unpacks stream into the layer. Fast path: the branch's new apparent size; naive
        path: the sum of the archive's entry sizes. A failure leaves the layer as it was.

        record: keep the archive's tar-split, so that diff against the parent gives back
        this very tar. Only an empty layer on the fast path is recorded. A digest string is
        the diff_id the caller checks itself; True hashes the stream here."""
        layer_id, parent = self._check(layer_id, parent)
        with self.locks.ids.hold(layer_id):
            with self.locks.root.hold():
                if self.locks.references.count(layer_id) or self.backend.is_mounted(
                        self.store.mount_path(layer_id)):
                    raise DiffError(f"layer {layer_id!r} is mounted: put it before applying "
                                    "a diff")
                if LayerReferences.held_elsewhere(self.store.diff_path(layer_id)):
                    # the swap at the end would pull the layer from under its users
                    raise LayerInUseError(f"layer {layer_id!r} is in use (held by another "
                                          "process, or a diff is being read): put it first")
                hold = self._hold(layer_id)
            try:
                # one apply per layer at a time, and no remove meanwhile, in any process
                guard = LayerReferences.lock_for_change(self.store.layer_file(layer_id))
            finally:
                os.close(hold)
            try:
                if not self.store.exists(layer_id):
                    raise LayerNotFoundError(f"layer {layer_id!r} was removed meanwhile")
                size = self._apply_staged(layer_id, parent, stream, allow_devices, record)
                if size is None:
                    size = native.directory_size(self.store.diff_path(layer_id))
            finally:
                os.close(guard)
        return size

    def _hold(self, layer_id: str) -> int:
        if not self.store.exists(layer_id):
            raise LayerNotFoundError(f"layer {layer_id!r} does not exist in {self.store.root}")
        try:
            return LayerReferences.hold_shared(self.store.diff_path(layer_id))
        except FileNotFoundError:
            raise LayerNotFoundError(f"layer {layer_id!r} lost its content; see `aufs fsck`"
                                     ) from None

    def _apply_staged(self, layer_id: str, parent: str, stream: BinaryIO,
                      allow_devices: bool, record: bool | str = False) -> int | None:
        """The apply proper, into a staged clone swapped in at the end; the layer's size, or
        None on the fast path when the caller has to measure the branch."""
        fast = self.is_parent(layer_id, parent)
        empty = fast and not os.listdir(self.store.diff_path(layer_id))
        recorder = None
        if record and empty:
            recorder = TarSplitRecorder(hash_stream=record is True)
        elif record:
            log.info("layer %s: not recording its tar-split (only an empty layer applied "
                     "against its own parent reproduces its tar)", layer_id[:12])
        self.store.remove_record(layer_id)  # the content changes: an old record is wrong
        tar_split = None
        try:
            with self.store.staging("apply") as staging:
                tree = os.path.join(staging, "tree")
                clone_tree(self.store.diff_path(layer_id), tree)
                if fast:
                    mode = (WhiteoutMode.OVERLAY if self.whiteout_format == "overlay"
                            else WhiteoutMode.LITERAL)
                    unpacked = extract(stream, tree, ExtractOptions(
                        mode, self.id_mapping, allow_devices, tar_split=recorder))
                    # into an empty layer with nothing replaced, the layer is what the
                    # entries added: no walk of it afterwards (the caller walks otherwise)
                    size = (unpacked.added_size if empty and not unpacked.removed_something
                            else None)
                else:
                    size = self._apply_through_union(layer_id, staging, tree, stream,
                                                     allow_devices)
                if recorder is not None:  # before the swap: a file that cannot be read
                    tar_split = self._finish_record(layer_id, recorder)  # back fails it
                with self.locks.root.hold():
                    exchange(tree, self.store.diff_path(layer_id))
                remove_tree(tree)
        except BaseException:
            if recorder is not None:
                recorder.abandon()  # its thread, and the files it holds for their CRCs
            raise
        if recorder is not None and tar_split is not None:
            diff_id = record if isinstance(record, str) else recorder.diff_id
            assert diff_id is not None
            self.store.write_record(layer_id, diff_id, tar_split)
        return size

    def _finish_record(self, layer_id: str, recorder: TarSplitRecorder) -> bytes | None:
        """The recorder's tar-split file, or None when the archive cannot be replayed. Raises
        OSError when a file's CRC could not be read back (a file that cannot be read back
        as it was written is an apply that failed)."""
        if recorder.unusable is not None:
            log.info("layer %s: no tar-split kept: %s", layer_id[:12], recorder.unusable)
            recorder.abandon()  # the files it still holds for their CRCs are closed now
            return None
        return recorder.finish()

    def _apply_through_union(self, layer_id: str, staging: str, tree: str, stream: BinaryIO,
                             allow_devices: bool) -> int:
        """Docker's naive ApplyDiff: unpack into the mounted union with whiteouts applied as
        deletions, here into a private mount whose upper dir is the staging clone."""
        parents = self.store.parent_ids(layer_id)
        if not parents:
            result = extract(stream, tree, ExtractOptions(WhiteoutMode.APPLY,
                                                          self.id_mapping, allow_devices))
            return result.header_bytes
        target = os.path.join(staging, "mnt")
        work = os.path.join(staging, "work")
        os.mkdir(target)
        os.mkdir(work)
        backend = self.backend
        request = MountRequest(layer_id=layer_id, upper=tree,
                               lowers=tuple(self.store.diff_path(p) for p in parents),
                               target=target, work=work if backend.needs_work_dir else None)
        backend.mount(request)
        try:
            result = extract(stream, target, ExtractOptions(WhiteoutMode.APPLY,
                                                            self.id_mapping,
                                                            allow_devices))
        except BaseException:
            with contextlib.suppress(AufsError):  # the archive's error is the one to tell
                self._unmount_private(layer_id, target)
            raise
        self._unmount_private(layer_id, target)
        return result.header_bytes

    def _unmount_private(self, layer_id: str, target: str) -> None:
        """Takes down the private union of a naive apply, retrying EBUSY as the driver's
        policy says: a subprocess that another thread forks (a fuse-overlayfs for another
        layer, say) holds a copy of our fds into the union until it execs, which makes a
        single umount2 fail now and then. A union still busy after the retries is detached
        lazily, so that the staging dir under it is removed without walking into the union
        (through which rmdir deletes into the upper dir, or fails), and the apply fails with
        UnmountBusyError: the union was still in use, so its upper dir is not swapped in."""
        backend = self.backend
        backend.before_unmount(target)
        try:
            unmount_with_retries(backend.unmount, target, self.retry_policy)
        except UnmountBusyError as error:
            try:
                backend.unmount(target, MNT_DETACH)
            except OSError as detach_error:
                raise MountError(f"layer {layer_id!r}: cannot detach the private union of a "
                                 f"naive apply at {target}: {detach_error.strerror}",
                                 errno=detach_error.errno or 0, target=target) from error
            raise UnmountBusyError(
                f"layer {layer_id!r} is unchanged: the union its diff was unpacked into "
                f"stayed busy through {max(1, self.retry_policy.unmount_attempts)} unmount "
                "attempts (a process held a file there); it was detached lazily. Retry",
                errno=error.errno, target=target) from error

    def diff_getter(self, layer_id: str) -> FileGetter:
        layer_id, _ = self._check(layer_id, "")
        return FileGetter(self.store.diff_path(layer_id))
