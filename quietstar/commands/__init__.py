"""The ``quietstar`` commands: one module each, holding its flags, its printing and its exit codes.

Each module provides ``add_arguments(parser)`` and ``run(args) -> int``; the algorithm lives in
the library modules they call.
"""
