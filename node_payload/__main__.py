import sys

from node_payload.cli import main

sys.exit(main())
