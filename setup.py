"""Builds the native extension aufs._native from aufs/_native.pyx and the plain C in csrc/.

AUFS_NO_EXTENSIONS=1 skips it; the package then runs on its pure-Python fallback.
"""

import os

from setuptools import Extension, setup

extensions = []
if os.environ.get("AUFS_NO_EXTENSIONS", "") in ("", "0"):
    from Cython.Build import cythonize

    native = Extension(
        "aufs._native",
        sources=["aufs/_native.pyx", "csrc/dirsize.c", "csrc/ioqueue.c", "csrc/mountdata.c",
                 "csrc/mountfrom.c", "csrc/nameset.c", "csrc/syscalls.c", "csrc/tarheader.c",
                 "csrc/tarbuild.c", "csrc/tartree.c", "csrc/unpackrun.c", "csrc/crc64.c",
                 "csrc/gzlines.c", "csrc/crcfd.c"],
        include_dirs=["csrc"],
        extra_compile_args=["-O2", "-Wall", "-Wno-unused-function"],
        extra_link_args=["-pthread"],
        libraries=["dl"],  # dlopen of libz, for tar-split (in libc itself since glibc 2.34)
    )
    extensions = cythonize([native], compiler_directives={"language_level": "3"})

setup(ext_modules=extensions)
