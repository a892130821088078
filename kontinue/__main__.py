import sys

from kontinue.cli import main

sys.exit(main())
