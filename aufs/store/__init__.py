"""The layer store: Docker's `layers/ diff/ mnt/` layout and the Driver over it.

`layout` reads and writes the store on disk, `driver` holds the lifecycle and its policy
(ids, references, locks, retries), `diffs` puts the archive engine to work on layers,
`backends/` union-mounts a layer over its parents (aufs, overlay, fuse-overlayfs), and
`migrate` and `fsck` convert and check a whole store.

May import: the native core, the public errors, and `aufs.archive`. It knows nothing of
images, Docker integrations or the command line.
"""
