"""`python -m semshare_ops.cli`: the `semshare` command without its console script."""
import sys

from . import main

sys.exit(main())
