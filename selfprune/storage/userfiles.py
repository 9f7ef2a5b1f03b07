"""Reading JSON files a user points us at, with errors that say what to pass instead."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.errors import UserError


def read_json(path: Path | str, what: str, expected: str) -> Any:
    """Parse ``path``; a missing or malformed file is a UserError naming ``what`` and ``expected``."""
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(f"{what} {p} does not exist; pass {expected}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{what} {p} is not valid JSON ({e}); pass {expected}") from None
