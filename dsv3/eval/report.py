"""Writing evaluation results."""

from __future__ import annotations

import json
import os


def write_json(report: dict, path: str) -> str:
    """`report` as indented JSON at `path` (parent directories created); returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1)
    return path
