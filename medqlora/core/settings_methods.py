"""What the typed params do beyond holding values: hand-written bases of medqlora/core/settings.py.

settings.py is generated from the schema (scripts/make_settings.py, whose METHODS says which
class gets which base); behaviour cannot live in a generated file, so it lives here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


class ModelMethods:
    """Methods of ModelParams."""

    base: str

    @property
    def is_local(self) -> bool:
        """True when `base` is a folder on disk rather than a hub id."""
        try:
            return Path(self.base).is_dir()
        except OSError:  # a name longer than the file system allows is no folder
            return False


class ParamsMethods:
    """Methods of Params."""

    raw: dict[str, Any]

    def section(self, *names: str) -> dict[str, Any]:
        """The resolved values of some sections, e.g. what a stage records in meta.json."""
        return {name: self.raw[name] for name in names}
