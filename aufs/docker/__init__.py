"""Docker itself: what reads or serves a Docker data root.

`rescue` rebuilds the images of an old Docker AUFS root byte for byte from Docker's
tar-split records.

May import: everything below it (`aufs.images`, `aufs.store`, `aufs.archive`, the core),
never the command line.
"""
