"""Build the optional native kernels (hashing, N-gram index search); all package metadata lives in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and ``engram.hashing``
falls back to its vectorised torch path (``engram.hashing.hasher.NATIVE_KERNEL_AVAILABLE`` says which).
"""

import sys

from setuptools import Extension, setup

_args = ["/O2"] if sys.platform == "win32" else ["-O3"]

setup(
    ext_modules=[
        Extension(
            "engram.hashing._hashkernel",
            sources=["src/engram/hashing/_hashkernel.c"],
            extra_compile_args=_args,
            optional=True,
        ),
        # Suffix-array searches of the N-gram index (engram.ngram); pure-Python fallback.
        Extension(
            "engram.ngram._ngramkernel",
            sources=["src/engram/ngram/_ngramkernel.c"],
            extra_compile_args=_args,
            optional=True,
        ),
    ]
)
