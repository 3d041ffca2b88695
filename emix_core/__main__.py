"""``python -m emix_core`` runs the ``emix`` command line."""

from emix_core.cli.main import main

main()
