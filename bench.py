"""Performance figures (benchmarks, not tests): `python bench.py COMMAND`.

Each command prints a rich table of what it measured on this machine.
"""
from __future__ import annotations

import argparse


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_, add_args) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        add_args(p)
        p.set_defaults(fn=fn)
    args = parser.parse_args(argv)
    args.fn(args)


# name -> (function(args), one-line help, function(parser) adding its flags). Each issue registers its own.
COMMANDS: dict = {}

if __name__ == "__main__":
    main()
