"""``python -m sagaway.cli``: the same as the ``sagaway`` command."""

from sagaway.cli import main

main()
