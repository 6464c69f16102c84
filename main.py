"""`python main.py ...`: tinyfast's command line from a checkout, the same as the installed `tinyfast` command.

The commands live in `tinyfast/cli.py`, inside the package, so that `pip install .` can install them as a console
script; this file only runs them.
"""
from tinyfast.cli import RANGES, app, bench_app  # noqa: F401  (the tests and a REPL reach the CLI here too)

if __name__ == "__main__":
    app()
