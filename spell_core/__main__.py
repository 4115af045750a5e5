"""`python -m spell_core` is `python -m spell_core.run`."""
import sys

from spell_core.run import main

sys.exit(main())
