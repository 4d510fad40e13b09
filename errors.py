"""How the command lines report a user's mistake: one line on stderr and exit status 2, as argparse does.

A bad flag value, a missing or corrupt file, an unknown architecture name: the library raises ``ValueError`` (or
``FileNotFoundError`` / ``FloatingPointError``) with a message that names the argument or file and what was expected.
``run(main)`` turns those into ``PROG: error: MESSAGE``; the traceback is printed only with ``--debug`` on the command
line or ``FINOLA_DEBUG=1`` in the environment. Anything else (a bug of ours) keeps its traceback.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, FloatingPointError)


def debugging(argv: list[str] | None = None) -> bool:
    return "--debug" in (sys.argv[1:] if argv is None else argv) or os.environ.get("FINOLA_DEBUG", "") not in ("", "0")


def run(main, argv: list[str] | None = None):
    """Call ``main(argv)`` (``--debug`` removed from the arguments); a user error ends the process with status 2."""
    args = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--debug"]
    try:
        return main(args)
    except USER_ERRORS as e:
        if debugging(argv):
            raise
        prog = Path(sys.argv[0]).name
        print(f"{prog}: error: {e}  (FINOLA_DEBUG=1 or --debug shows the traceback)", file=sys.stderr)
        sys.exit(2)
