"""The ``emix`` command line: click commands built by a factory (:func:`main.build_cli`)."""
