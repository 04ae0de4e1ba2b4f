import sys

from rlstop.cli import main

sys.exit(main())
