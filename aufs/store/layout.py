"""The on-disk store: Docker's `layers/ diff/ mnt/` layout, the parent-chain metadata, the
whiteout-format marker, each layer's tar-split record and the start-up cleanup of
interrupted work.

`layerdb/<id>/` (ours; Docker's aufs code never looks there) holds what a layer applied from
an image needs to give back its original tar: `diff` (the diff_id the tar must have),
`tar-split.json.gz` (Docker's format) and, once known, `source.json` (the compressed blob it
came in). The folder is made whole in staging/ and renamed into place.

`layers/<id>` is the commit point: a layer exists exactly when that file does. Everything a
crash can leave behind (`*-removing`, `staging/` entries, dirs without a layers file) is
either cleaned at start-up or reported by fsck.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from aufs.archive.tarsplit import FILE_NAME as TAR_SPLIT_FILE
from aufs.errors import AufsError, LayerNotFoundError
from aufs.ids import REMOVING_SUFFIX, validate_layer_id
from aufs.store.atomic import atomic_remove, atomic_write, fsync_directory, remove_tree

log = logging.getLogger(__name__)

ROOT_MODE = 0o710  # Docker 20.10's mode for ROOT and its layers/ diff/ mnt/
LAYER_DIR_MODE = 0o755
FORMAT_MARKER = "whiteout-format"
WHITEOUT_FORMATS = ("aufs", "overlay")
# the id suffix of a layer that an import or pull is still filling; renamed when whole
INCOMPLETE_SUFFIX = "-incomplete"
RECORD_DIFF_ID = "diff"
RECORD_SOURCE = "source.json"


class TarSplitRecord(NamedTuple):
    diff_id: str  # the digest the replayed tar must have
    tar_split: str  # path of tar-split.json.gz
    source: dict[str, object] | None  # the compressed blob the layer came in, if known


# overlay2's short names: ROOT/l/<26 chars> -> ../diff/<id>, so that a deep chain's lowerdir
# data, relative to ROOT, fits in one page (Docker's overlay2 gets 128 layers in that way)
LINK_DIR = "l"
SHORT_LINK_LENGTH = 26


def short_link_name(layer_id: str) -> str:
    """The layer's name in l/. Docker's overlay2 draws it at random and keeps it in a file
    inside the layer dir; here it comes from the id (base32 of its sha256, cut to overlay2's
    26 characters), so Docker's aufs layout gains no file and any process finds it again."""
    digest = hashlib.sha256(layer_id.encode()).digest()
    return base64.b32encode(digest).decode()[:SHORT_LINK_LENGTH]


@dataclass(frozen=True)
class MountChain:
    """What mounting a layer needs from the store, cached per layer: its ancestors (nearest
    first), their diff dirs, and their lowerdir data through the short links, relative to
    the root (None where the links cannot be made, a read-only root say)."""

    parents: tuple[str, ...]
    lowers: tuple[str, ...]
    short_lowerdir: str | None
    short_lowerdir_absolute: str | None = None  # the same links by full path


class CorruptStoreError(AufsError):
    """The store's metadata cannot be read as Docker wrote it."""


class Store:
    """Paths and metadata of one store root. Callers hold the root lock around changes."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.layers_dir = os.path.join(root, "layers")
        self.diff_dir = os.path.join(root, "diff")
        self.mnt_dir = os.path.join(root, "mnt")
        self.work_dir = os.path.join(root, "work")
        self.staging_dir = os.path.join(root, "staging")
        self.layerdb_dir = os.path.join(root, "layerdb")
        self.link_dir = os.path.join(root, LINK_DIR)
        # layers/<id> never changes once written; a chain is re-read only if the file is
        # replaced (another process removed and re-created the id). Changes made through
        # this Store also drop the entry (forget_chain).
        self._chains: dict[str, tuple[tuple[int, int, int], tuple[str, ...]]] = {}
        self._mount_chains: dict[str, tuple[tuple[int, int, int], bool, MountChain]] = {}
        self._work_dirs: set[str] = set()  # work/<id> known to exist

    # ---- paths ----------------------------------------------------------------------------

    # A layer id holds no "/" (aufs.ids), so these are plain concatenations: get and put
    # call them a dozen times, and os.path.join showed in their profile.

    def layer_file(self, layer_id: str) -> str:
        return self.layers_dir + "/" + layer_id

    def diff_path(self, layer_id: str) -> str:
        return self.diff_dir + "/" + layer_id

    def mount_path(self, layer_id: str) -> str:
        return self.mnt_dir + "/" + layer_id

    def work_path(self, layer_id: str) -> str:
        return self.work_dir + "/" + layer_id

    def short_link_path(self, layer_id: str) -> str:
        return os.path.join(self.link_dir, short_link_name(layer_id))

    @staticmethod
    def short_link_target(layer_id: str) -> str:
        return f"../diff/{layer_id}"

    def record_path(self, layer_id: str) -> str:
        """layerdb/<id>: the layer's tar-split record, when it has one."""
        return os.path.join(self.layerdb_dir, layer_id)

    # ---- layout ---------------------------------------------------------------------------

    def is_new(self) -> bool:
        """No layers yet and no format chosen: any backend may claim this root."""
        if os.path.exists(os.path.join(self.root, FORMAT_MARKER)):
            return False
        try:
            return not any(True for entry in os.scandir(self.layers_dir) if not entry.is_dir())
        except FileNotFoundError:
            return True

    def ensure_layout(self, owner: tuple[int, int]) -> None:
        """Creates ROOT, layers/, diff/ and mnt/ with Docker's mode and owner, and re-applies
        them to existing dirs as Docker does."""
        for path in (self.root, self.layers_dir, self.diff_dir, self.mnt_dir):
            os.makedirs(path, mode=ROOT_MODE, exist_ok=True)
            _set_mode_and_owner(path, ROOT_MODE, owner)

    def read_format(self) -> str | None:
        """The whiteout format the marker records; None when there is no marker."""
        try:
            with open(os.path.join(self.root, FORMAT_MARKER)) as marker:
                value = marker.read().strip()
        except FileNotFoundError:
            return None
        if value not in WHITEOUT_FORMATS:
            raise CorruptStoreError(
                f"{os.path.join(self.root, FORMAT_MARKER)} says {value!r}; expected one of "
                f"{', '.join(WHITEOUT_FORMATS)}"
            )
        return value

    def write_format(self, whiteout_format: str) -> None:
        os.makedirs(self.staging_dir, mode=0o700, exist_ok=True)
        atomic_write(os.path.join(self.root, FORMAT_MARKER), f"{whiteout_format}\n".encode(),
                     temp_dir=self.staging_dir)

    # ---- metadata -------------------------------------------------------------------------

    def exists(self, layer_id: str) -> bool:
        return os.path.lexists(self.layer_file(layer_id))

    def ids(self) -> list[str]:
        """Every layer id: the non-directory entries of layers/, sorted (Docker's loadIds)."""
        try:
            with os.scandir(self.layers_dir) as entries:
                return sorted(entry.name for entry in entries if not entry.is_dir())
        except FileNotFoundError:
            return []

    def parent_ids(self, layer_id: str) -> list[str]:
        """The layer's ancestors, direct parent first, as its layers file lists them."""
        return list(self._chain(layer_id)[1])

    def _chain(self, layer_id: str) -> tuple[tuple[int, int, int], tuple[str, ...]]:
        """(identity of layers/<id>, its ancestors): one stat when the cache is current."""
        path = self.layer_file(layer_id)
        try:
            info = os.stat(path)
            cached = self._chains.get(layer_id)
            if cached is not None and cached[0] == (info.st_ino, info.st_mtime_ns,
                                                    info.st_size):
                return cached
            with open(path, "rb") as handle:
                info = os.fstat(handle.fileno())
                content = handle.read(1 << 20)
        except FileNotFoundError:
            self.forget_chain(layer_id)
            raise LayerNotFoundError(f"layer {layer_id!r} does not exist in {self.root}") from None
        entry = ((info.st_ino, info.st_mtime_ns, info.st_size),
                 tuple(self._parse_chain(path, layer_id, content)))
        self._chains[layer_id] = entry
        return entry

    def mount_chain(self, layer_id: str, *, short_links: bool) -> MountChain:
        """The layer's ancestors with their diff dirs and (with short_links) their lowerdir
        data through l/, cached until layers/<id> changes. Missing links are made here, so a
        store that Docker (or an older aufs) wrote gains them on its first mount."""
        identity, parents = self._chain(layer_id)
        cached = self._mount_chains.get(layer_id)
        if cached is not None and cached[0] == identity and cached[1] == short_links:
            return cached[2]
        short_lowerdir: str | None = None
        absolute: str | None = None
        if short_links:
            try:
                for parent in parents:
                    self.ensure_short_link(parent)
                names = [short_link_name(parent) for parent in parents]
                short_lowerdir = ":".join(f"{LINK_DIR}/{name}" for name in names)
                absolute = ":".join(os.path.join(self.link_dir, name) for name in names)
            except OSError as error:  # a read-only root: full paths still work
                log.debug("cannot make short links in %s (%s); using full paths",
                          self.link_dir, error)
        chain = MountChain(parents, tuple(self.diff_path(parent) for parent in parents),
                           short_lowerdir, absolute)
        self._mount_chains[layer_id] = (identity, short_links, chain)
        return chain

    def forget_chain(self, layer_id: str | None = None) -> None:
        """Drops the cached chain of one layer, or of all (after a migration or repair)."""
        if layer_id is None:
            self._chains.clear()
            self._mount_chains.clear()
            self._work_dirs.clear()
        else:
            self._chains.pop(layer_id, None)
            self._mount_chains.pop(layer_id, None)
            self._work_dirs.discard(layer_id)

    # ---- short links (l/) -----------------------------------------------------------------

    def short_link_ok(self, layer_id: str) -> bool:
        try:
            return os.readlink(self.short_link_path(layer_id)) == self.short_link_target(
                layer_id)
        except OSError:  # missing, or not a symlink
            return False

    def ensure_short_link(self, layer_id: str) -> None:
        """Makes l/<short name> -> ../diff/<id> unless it is there: a new symlink renamed
        over the name, so no reader ever sees a missing or half-made link."""
        if self.short_link_ok(layer_id):
            return
        if not os.path.isdir(self.link_dir):
            os.makedirs(self.link_dir, mode=ROOT_MODE, exist_ok=True)
        path = self.short_link_path(layer_id)
        temporary = os.path.join(self.link_dir,
                                 f".{os.path.basename(path)}.{os.getpid()}.{time.monotonic_ns()}")
        os.symlink(self.short_link_target(layer_id), temporary)
        try:
            os.rename(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def remove_short_link(self, layer_id: str) -> None:
        """Removes the layer's link if it is the layer's (never another layer's)."""
        if self.short_link_ok(layer_id):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.short_link_path(layer_id))

    @staticmethod
    def _parse_chain(path: str, layer_id: str, content: bytes) -> list[str]:
        parents = []
        for number, raw_line in enumerate(content.split(b"\n"), start=1):
            line = raw_line.removesuffix(b"\r")
            if not line:
                continue
            try:
                parents.append(validate_layer_id(line.decode("utf-8"), "parent id"))
            except (UnicodeDecodeError, AufsError) as error:
                raise CorruptStoreError(
                    f"{path} line {number} is not a layer id ({error}); restore the file or "
                    "remove the layer"
                ) from None
        if layer_id in parents:
            raise CorruptStoreError(f"{path} lists the layer as its own ancestor")
        return parents

    def write_layer_file(self, layer_id: str, parents: list[str]) -> None:
        """Writes layers/<id> atomically: one id per line, direct parent first."""
        os.makedirs(self.staging_dir, mode=0o700, exist_ok=True)
        content = "".join(f"{parent}\n" for parent in parents).encode()
        self.forget_chain(layer_id)
        atomic_write(self.layer_file(layer_id), content, temp_dir=self.staging_dir)

    def remove_layer_file(self, layer_id: str) -> None:
        self.forget_chain(layer_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.layer_file(layer_id))
        fsync_directory(self.layers_dir)

    def children(self, layer_id: str) -> list[str]:
        """Layers whose direct parent is layer_id."""
        found = []
        for other in self.ids():
            try:
                with open(self.layer_file(other), "rb") as handle:
                    first = handle.readline().rstrip(b"\r\n")
            except OSError:
                continue
            if first == layer_id.encode():
                found.append(other)
        return found

    # ---- tar-split records ----------------------------------------------------------------

    def read_record(self, layer_id: str) -> TarSplitRecord | None:
        """The layer's tar-split record; None when it has none. CorruptStoreError when its
        diff file is unreadable."""
        folder = self.record_path(layer_id)
        try:
            with open(os.path.join(folder, RECORD_DIFF_ID), "rb") as handle:
                raw = handle.read(200)
        except (FileNotFoundError, NotADirectoryError):
            return None
        diff_id = raw.decode("ascii", "replace").strip()
        if not diff_id.startswith("sha256:") or len(diff_id) != 71:
            raise CorruptStoreError(f"{folder}/{RECORD_DIFF_ID} holds no sha256 digest")
        source: dict[str, object] | None = None
        with contextlib.suppress(FileNotFoundError, ValueError), \
                open(os.path.join(folder, RECORD_SOURCE), "rb") as handle:
            loaded = json.load(handle)
            source = loaded if isinstance(loaded, dict) else None
        return TarSplitRecord(diff_id, os.path.join(folder, TAR_SPLIT_FILE), source)

    def write_record(self, layer_id: str, diff_id: str, tar_split: bytes) -> None:
        """Replaces the layer's record with a new one, atomically (the whole folder)."""
        os.makedirs(self.staging_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.layerdb_dir, mode=0o700, exist_ok=True)
        temporary = tempfile.mkdtemp(prefix=".record-", dir=self.staging_dir)
        try:
            for name, data in ((TAR_SPLIT_FILE, tar_split), (RECORD_DIFF_ID, diff_id.encode())):
                with open(os.path.join(temporary, name), "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
            fsync_directory(temporary)
            self.remove_record(layer_id)
            os.rename(temporary, self.record_path(layer_id))
        except BaseException:
            remove_tree(temporary)
            raise
        fsync_directory(self.layerdb_dir)

    def write_record_source(self, layer_id: str, source: dict[str, object]) -> None:
        """Notes the compressed blob the layer came in (digest, size, mediaType, and the
        registry repository), beside its record."""
        folder = self.record_path(layer_id)
        if os.path.isdir(folder):
            atomic_write(os.path.join(folder, RECORD_SOURCE), json.dumps(source).encode(),
                         temp_dir=self.staging_dir)

    def remove_record(self, layer_id: str) -> None:
        if os.path.lexists(self.record_path(layer_id)):
            atomic_remove(self.record_path(layer_id))

    def rename_record(self, layer_id: str, new_id: str) -> None:
        if os.path.lexists(self.record_path(new_id)):
            atomic_remove(self.record_path(new_id))
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.record_path(layer_id), self.record_path(new_id))
            fsync_directory(self.layerdb_dir)

    def recorded_ids(self) -> list[str]:
        try:
            with os.scandir(self.layerdb_dir) as entries:
                return sorted(entry.name for entry in entries
                              if not entry.name.endswith(REMOVING_SUFFIX))
        except FileNotFoundError:
            return []

    # ---- layer directories ----------------------------------------------------------------

    def make_layer_dirs(self, layer_id: str, owner: tuple[int, int], *, work: bool) -> None:
        """Creates diff/<id> and mnt/<id> (and work/<id>) fresh. Dirs left by a create that
        crashed before its commit are not a layer, so they are cleared first."""
        paths = [self.mount_path(layer_id), self.diff_path(layer_id)]
        if work:
            os.makedirs(self.work_dir, mode=ROOT_MODE, exist_ok=True)
            paths.append(self.work_path(layer_id))
        for path in paths:
            if os.path.lexists(path):
                log.info("clearing %s, left by an interrupted create", path)
                atomic_remove(path)
            os.mkdir(path, LAYER_DIR_MODE)
            _set_mode_and_owner(path, LAYER_DIR_MODE, owner)

    def ensure_work_dir(self, layer_id: str, owner: tuple[int, int]) -> None:
        """work/<id> for backends that need one; layers Docker made have none until mounted.
        Looked for once per layer (a mount that finds it gone calls forget_chain first)."""
        if layer_id in self._work_dirs:
            return
        path = self.work_path(layer_id)
        if not os.path.isdir(path):
            os.makedirs(self.work_dir, mode=ROOT_MODE, exist_ok=True)
            os.mkdir(path, LAYER_DIR_MODE)
            _set_mode_and_owner(path, LAYER_DIR_MODE, owner)
        self._work_dirs.add(layer_id)

    def remove_layer_dirs(self, layer_id: str) -> None:
        self.forget_chain(layer_id)
        self.remove_short_link(layer_id)
        for path in (self.record_path(layer_id), self.diff_path(layer_id),
                     self.mount_path(layer_id), self.work_path(layer_id)):
            atomic_remove(path)

    # ---- staging and start-up cleanup -----------------------------------------------------

    @contextlib.contextmanager
    def staging(self, purpose: str) -> Iterator[str]:
        """A private directory on the store's filesystem, flocked while in use so that
        another process's start-up cleanup leaves it alone; removed afterwards."""
        with self._staging_locked():  # so no cleanup sees it before it is locked
            path = tempfile.mkdtemp(prefix=f"{purpose}-", dir=self.staging_dir)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            try:
                remove_tree(path)
            finally:
                os.close(fd)

    def clean_stale(self) -> None:
        """Docker's start-up cleanup of `*-removing` dirs in mnt/ and diff/ (and our work/),
        plus staging entries whose owner is gone. Failures are logged, never raised."""
        for parent in (self.mnt_dir, self.diff_dir, self.work_dir, self.layerdb_dir):
            try:
                entries = list(os.scandir(parent))
            except FileNotFoundError:
                continue
            except OSError as error:
                log.error("error reading dir entries of %s: %s", parent, error)
                continue
            for entry in entries:
                if entry.name.endswith(REMOVING_SUFFIX) and entry.is_dir(follow_symlinks=False):
                    log.debug("cleaning up stale layer dir %s", entry.path)
                    try:
                        remove_tree(entry.path)
                    except OSError as error:
                        log.error("error removing stale layer dir %s: %s", entry.path, error)
        self._clean_abandoned_staging()

    @contextlib.contextmanager
    def _staging_locked(self) -> Iterator[None]:
        """An exclusive flock on staging/ itself: held while an entry is made and locked,
        and while abandoned entries are looked for."""
        os.makedirs(self.staging_dir, mode=0o700, exist_ok=True)
        fd = os.open(self.staging_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _clean_abandoned_staging(self) -> None:
        if not os.path.isdir(self.staging_dir):
            return
        try:
            with self._staging_locked():
                self._remove_abandoned_staging()
        except OSError as error:  # a read-only root, say: nothing to clean there anyway
            log.debug("cannot clean %s: %s", self.staging_dir, error)

    def _remove_abandoned_staging(self) -> None:
        try:
            entries = list(os.scandir(self.staging_dir))
        except OSError:
            return
        for entry in entries:
            if not entry.is_dir(follow_symlinks=False):
                # a temp file of an atomic write; old ones belong to no live writer
                with contextlib.suppress(OSError):
                    if time.time() - entry.stat(follow_symlinks=False).st_mtime > 600:
                        os.unlink(entry.path)
                continue
            try:
                fd = os.open(entry.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    log.error("cannot lock %s: %s", entry.path, error)
                os.close(fd)
                continue  # still in use by another process
            try:
                log.debug("cleaning up abandoned staging dir %s", entry.path)
                remove_tree(entry.path)
            except OSError as error:
                log.error("error removing %s: %s", entry.path, error)
            finally:
                os.close(fd)


def _set_mode_and_owner(path: str, mode: int, owner: tuple[int, int]) -> None:
    """Docker re-applies these on every start; only change what differs, so that a root on
    a read-only mount still opens."""
    info = os.lstat(path)
    if stat.S_IMODE(info.st_mode) != mode:
        os.chmod(path, mode)
    if (info.st_uid, info.st_gid) != owner:
        try:
            os.chown(path, *owner)
        except PermissionError:
            if os.geteuid() == 0:
                raise
            log.debug("cannot chown %s to %s as an unprivileged user", path, owner)
