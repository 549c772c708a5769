"""`python -m fedpeft_edge.cli` runs the umbrella command."""

import sys

from fedpeft_edge.cli import main

sys.exit(main())
