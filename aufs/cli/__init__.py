"""The command line: `aufs ...` (`main`), its progress display, human sizes (`sizes`), the
demo and the sample image it ships.

The only part of the package that prints. May import every other part.
"""
