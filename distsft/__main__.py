import sys

from distsft.cli import main

sys.exit(main())
