"""``python -m tsunagu`` runs the ``tsunagu`` command."""

import sys

from tsunagu.cli import main

if __name__ == "__main__":
    sys.exit(main())
