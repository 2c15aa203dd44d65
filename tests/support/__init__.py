"""Harnesses shared by the tests: the in-memory TURN client (``turn_harness``), real server and
client processes for interoperability (``interop``) and the browser (``browser``), the server's
audit records and which worker served them (``audit``), and background load on loopback
(``loopback_load``, run as a script).

``tests/`` is on the import path because its ``conftest.py`` is a rootdir conftest without a
package, so tests import these as ``support.<module>``.
"""
