"""The archive engine: layer tars in and out of a directory, safely.

It parses tar headers (`format`, `reader`), unpacks untrusted archives without escaping
their root (`extract`, `beneath`, `staging`), writes archives from a tree (`export`),
computes change lists (`changes`) and converts whiteout formats (`whiteouts`, `idmap` for
owners).

May import: the native core and the public errors (`aufs._implementation`, `aufs.errors`,
`aufs.machine`, `aufs.ids`). It knows nothing of the layer store, images or the command line.
"""
