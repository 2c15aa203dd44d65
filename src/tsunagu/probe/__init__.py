"""Diagnostics: a TURN load generator and the client-side pieces it is built from."""
