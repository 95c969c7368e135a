"""`python -m twist_jax.evaluate`: see twist_jax/evaluate/cli.py (or --help)."""

import sys

from twist_jax.evaluate.cli import main

sys.exit(main())
