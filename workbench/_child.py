"""Entry point of a step's child process; see :func:`workbench.runner.child_main`."""

import sys

from workbench.runner import child_main

if __name__ == "__main__":
    child_main(int(sys.argv[1]))
