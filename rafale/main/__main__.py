"""`python rafale/main -c cfg.yaml`, the spelling of the original README: Python runs this folder.

The folder has no __init__.py, so `import rafale.main` still finds the module rafale/main.py beside it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))  # the repository root

from rafale.main import main  # noqa: E402

if __name__ == "__main__":
    main()
