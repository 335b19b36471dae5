"""The ``quietstar`` commands: one module each, holding its flags, its printing and its exit codes.

Each module provides ``HELP``, ``add_arguments(parser)``, ``run(args) -> int`` and
``main(argv=None) -> int``; its flags come from typed dataclasses (``quietstar.utils.settings``), the
model's from ``common.ModelArguments``. The algorithm lives in the library modules they call.
"""
