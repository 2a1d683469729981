import sys

from aggregation.cli import main

sys.exit(main())
