"""`python -m aufs` runs the command line."""

import sys

from aufs.cli import main

sys.exit(main())
