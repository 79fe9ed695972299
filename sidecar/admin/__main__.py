"""``python -m sidecar.admin`` is ``safous-admin``."""

from .cli import main

main()
