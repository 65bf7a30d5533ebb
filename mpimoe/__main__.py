import signal
import sys

# a Ctrl-C while Python loads the modules waits until they are in: an import
# broken off half-way can crash the interpreter on its way out
_early = []
signal.signal(signal.SIGINT, lambda signum, frame: _early.append(signum))
from mpimoe.cli.main import main  # noqa: E402
signal.signal(signal.SIGINT, signal.default_int_handler)
if _early:
    sys.stderr.write('mpimoe: interrupted\n')
    sys.exit(130)

sys.exit(main())
