import sys

from mlsae.cli import main

sys.exit(main())
