"""``python -m segens.cli``: the same as the ``ens`` command."""

from segens.cli import main

main()
