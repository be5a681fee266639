"""`python -m lmscore.cli`: the `lmscore` command."""

import sys

from lmscore.cli import main

sys.exit(main())
