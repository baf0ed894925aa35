"""Where the tests find the repository and its recorded /proc text, wherever they live."""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
