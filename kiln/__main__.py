"""`python -m kiln ...` is `kiln ...`; under torchrun: `torchrun --nproc-per-node 4 -m kiln train RECIPE`."""

import sys

from kiln.cli import main

sys.exit(main())
