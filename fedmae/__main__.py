import sys

from fedmae.cli import main

sys.exit(main())
