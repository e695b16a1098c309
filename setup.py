"""Builds the optional one-pass CPU statistics kernel.

The kernel is plain C (no torch headers, so no torch in the build
environment).  ``optional=True``: on a machine without a compiler the build
is skipped and gradguard falls back to torch's own ops.
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gradguard._cstats",
            ["src/gradguard/_cstats.c"],
            extra_compile_args=["-O3", "-fopenmp-simd", "-std=c11"],
            extra_link_args=["-lpthread"],
            optional=True,
        )
    ]
)
