"""`python -m oodpl.cli ...` (e.g. under `accelerate launch -m oodpl.cli`): the `oodpl` command."""

import sys

from oodpl.cli.main import main

sys.exit(main())
