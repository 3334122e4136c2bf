"""`python -m aufs` runs the command line."""

import sys

from aufs.cli.main import main

sys.exit(main())
