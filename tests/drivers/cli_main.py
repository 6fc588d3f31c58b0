"""``fedecay`` as a user runs it (argv after the script), in a process of its own.

Prints ``DRIVER DONE`` after ``main`` returns and exits with its code.
"""

import sys

from simulations.cli import main

if __name__ == "__main__":
    code = main(sys.argv[1:])
    print("DRIVER DONE", flush=True)
    sys.exit(code)
