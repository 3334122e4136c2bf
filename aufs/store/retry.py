"""The unmount retry policy, with Docker's numbers as defaults."""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aufs import _implementation as native
from aufs.errors import MountError, UnmountBusyError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try before giving up on a busy mount.

    unmount_attempts / unmount_delay: plain umount2 tries while it returns EBUSY (Docker: 5,
    100 ms). auplink_retries: extra `auplink flush` runs while it exits with 22 (Docker: 5).
    remove_busy_attempts / remove_busy_delay: deleting a tree that reports EBUSY (Docker's
    EnsureRemoveAll: 50, 100 ms).
    """

    unmount_attempts: int = 5
    unmount_delay: float = 0.1
    auplink_retries: int = 5
    remove_busy_attempts: int = 50
    remove_busy_delay: float = 0.1


def unmount_with_retries(
    unmount: Callable[[str, int], None],
    target: str,
    policy: RetryPolicy,
    *,
    force: bool = False,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Unmounts target with plain umount2, retrying EBUSY as the policy says.

    Returns True when something was unmounted, False when target was not mounted (EINVAL,
    or ENOENT: no such directory).
    When it stays busy: with force, detach it lazily (MNT_DETACH) and return True; else raise
    UnmountBusyError and leave it mounted.
    """
    attempts = max(1, policy.unmount_attempts)
    for attempt in range(1, attempts + 1):
        try:
            unmount(target, 0)
            return True
        except OSError as error:
            if error.errno in (errno.EINVAL, errno.ENOENT):
                return False
            if error.errno != errno.EBUSY:
                raise MountError(
                    f"cannot unmount {target}: {error.strerror}",
                    errno=error.errno or 0, target=target,
                ) from error
            if attempt < attempts:
                log.debug("unmount %s: busy (retrying %d/%d)", target, attempt, attempts - 1)
                sleep(policy.unmount_delay)
            last_error = error
    if force:
        log.warning("unmount %s: still busy after %d tries; detaching it lazily", target,
                    attempts)
        unmount(target, native.MNT_DETACH)
        return True
    raise UnmountBusyError(
        f"{target} is still busy after {attempts} unmount attempts: a process holds a file or "
        f"its working directory there. Close it (see `fuser -vm {target}`) and retry, or remove "
        "with force=True to detach it lazily",
        errno=errno.EBUSY, target=target,
    ) from last_error
