"""Test-wide setup: the repo root (the three scripts) and tests/ (the lab harness) on sys.path.

Markers and options live in setup.cfg; the lab's own rules live in tests/lab/conftest.py.
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for _p in (str(ROOT / "tests"), str(ROOT)):
    if _p not in sys.path:
        sys.path.insert(0, _p)
