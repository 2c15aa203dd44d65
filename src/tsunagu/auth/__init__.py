"""Credential backends and credential arithmetic for the long-term mechanism.

The TURN core asks one question: "what is the key of user U in realm R?". Everything in
this package answers it, from static users to time-limited TURN REST API credentials.
"""
