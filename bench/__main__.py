"""`python -m bench` from a checkout (installed: `pydpm bench`)."""
from . import run

raise SystemExit(run())
