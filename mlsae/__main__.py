"""`python -m mlsae`: the `mlsae` command (what torchrun runs). Uses the CLI."""

import sys

from mlsae.cli import main

sys.exit(main())
