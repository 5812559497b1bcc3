import sys

from apt.cli import main

sys.exit(main())
