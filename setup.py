"""Builds the optional C relay path; everything else is configured in pyproject.toml.

Where it cannot be built (no compiler, not Linux), tsunagu installs and runs on the
pure-Python path; TSUNAGU_NO_EXTENSION=1 leaves it out on purpose (a wheel for machines
without the C library this one has, or to run the pure-Python path only).
"""

import os
import sys

from setuptools import Extension, setup

extensions = []
wanted = os.environ.get("TSUNAGU_NO_EXTENSION", "").strip() in ("", "0")
if sys.platform.startswith("linux") and wanted:
    extensions.append(
        Extension(
            "tsunagu.transport._fastpath",
            ["src/tsunagu/transport/_fastpath.c"],
            extra_compile_args=[
                "-O2",
                "-Wall",
                "-Wextra",
                "-Wno-missing-field-initializers",
                "-Wno-unused-parameter",
            ],
            optional=True,
        )
    )

setup(ext_modules=extensions)
