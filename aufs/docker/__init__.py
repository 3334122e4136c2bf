"""Docker itself: what reads or serves a Docker data root.

`rescue` rebuilds the images of an old Docker AUFS root byte for byte from Docker's
tar-split records. `plugin` serves Docker's graphdriver plugin protocol over a unix socket
(`pluginhttp` is its HTTP), so that dockerd keeps its images and containers in the store.

May import: everything below it (`aufs.images`, `aufs.store`, `aufs.archive`, the core),
never the command line.
"""
