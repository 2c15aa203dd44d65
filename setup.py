"""Builds the optional C relay path; everything else is configured in pyproject.toml.

Where it cannot be built (no compiler, not Linux), tsunagu installs and runs on the
pure-Python path.
"""

import sys

from setuptools import Extension, setup

extensions = []
if sys.platform.startswith("linux"):
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
