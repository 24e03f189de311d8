import sys

from lightning_overtrain.cli.main import main

sys.exit(main())
