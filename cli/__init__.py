"""The ``cxr-drift`` command line: one entry point (:mod:`cli.main`) and one module per subcommand.

Every command module exposes ``configure_parser(parser)`` and ``run(args) -> int`` and nothing else public;
the work itself lives in the layers below (core, training, engine, service).
"""
