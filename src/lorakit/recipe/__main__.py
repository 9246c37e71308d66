"""`python -m lorakit.recipe README.md` (`make docs`): regenerate the recipe key reference."""

import sys
from pathlib import Path

from lorakit.recipe.reference import update_reference

update_reference(Path(sys.argv[1] if len(sys.argv) > 1 else "README.md"))
