"""Administration: the user database from the shell (``tsunagu user``, ``secret``,
``revoke``)."""
