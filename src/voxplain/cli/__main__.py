"""``python -m voxplain.cli``."""

from voxplain.cli import app

app()
