"""``python -m search`` = the ``prunesearch`` command."""

import sys

from search.cli import main

sys.exit(main())
