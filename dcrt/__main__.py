"""``python -m dcrt``: the same as the ``dcrt`` command."""
import sys

from .cli import main

sys.exit(main())
