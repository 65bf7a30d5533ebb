import sys

try:
    from mpimoe.cli import main
except KeyboardInterrupt:       # Ctrl-C while Python loads the modules
    sys.stderr.write('mpimoe: interrupted\n')
    sys.exit(130)

sys.exit(main())
