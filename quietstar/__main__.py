import sys

from quietstar.cli.main import main

sys.exit(main())
