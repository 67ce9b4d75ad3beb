"""`python -m peft_d2c.cli ...` is the `peft-d2c` command."""

import sys

from .main import main

sys.exit(main())
