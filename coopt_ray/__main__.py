"""`python -m coopt_ray`: the same as the `coopt` command."""
import sys

from .cli import main

sys.exit(main())
