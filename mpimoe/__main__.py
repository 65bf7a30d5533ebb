import sys

from mpimoe.cli import main

sys.exit(main())
