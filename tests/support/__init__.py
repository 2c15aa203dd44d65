"""Harnesses shared by the tests: the in-memory TURN client (``turn_harness``), real server and
client processes for interoperability (``interop``) and the browser (``browser``).

``tests/`` is on the import path because its ``conftest.py`` is a rootdir conftest without a
package, so tests import these as ``support.<module>``.
"""
