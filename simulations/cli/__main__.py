"""``python -m simulations.cli``: the same as the ``fedecay`` command."""

import sys

from simulations.cli import main

sys.exit(main())
