"""``python -m distill_pl.cli``: the ``distill-pl`` command."""

from distill_pl.cli.main import main

main()
