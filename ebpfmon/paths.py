"""Where the probes' C sources and the shipped rule packs are.

In a checkout they are the top-level probes/ and rules/ next to the package;
installed from a wheel they are data files under <prefix>/share/ebpfmon/.
"""

from __future__ import annotations

import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
INSTALLED = Path(sys.prefix) / "share" / "ebpfmon"


def data_dir(name: str) -> Path:
    for base in (CHECKOUT, INSTALLED):
        if (base / name).is_dir():
            return base / name
    return CHECKOUT / name  # not found: errors name the checkout layout


PROBES_DIR = data_dir("probes")
RULES_DIR = data_dir("rules")
