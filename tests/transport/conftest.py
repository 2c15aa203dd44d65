"""Fixtures of the runtime tests: each test gets a ``tsunagu serve`` process of its own."""

from __future__ import annotations

import sys
from pathlib import Path

# The process helpers live with the interoperability tests; test directories are not
# packages, so the helpers' directory goes on the import path.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "interop"))
