"""`python -m lorakit.cli`: the same as the `lorakit` command."""

from lorakit.cli import app

app()
