"""The example systems (``examples/`` at the repository root) under test.

``examples`` is not part of the installed package: the repository root goes on
``sys.path`` here, and the services the tests start get it on their PYTHONPATH
(``examples.launch``).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
