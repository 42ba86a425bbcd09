import sys

from fedmae.cli.main import main

sys.exit(main())
