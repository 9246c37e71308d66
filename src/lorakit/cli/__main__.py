"""`python -m lorakit.cli`: the same as the `lorakit` command."""

from lorakit.cli import main

main()
