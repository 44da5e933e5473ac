"""``python -m lowbit ...`` = the ``lowbit`` command (so ``torchrun -m lowbit train ...``
works)."""

import sys

from lowbit.cli import main

sys.exit(main())
