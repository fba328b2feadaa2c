"""Read a ``--config FILE.yaml``: a mapping of a command's option names to values.

torch-free; PyYAML's safe loader only (no Python objects from a user's file).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import UsageError

# Shipped presets live inside the package (so a non-editable install finds them) and are named
# by their stem: ``--config voxceleb1-o``.
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs"


def presets() -> dict[str, Path]:
    """Shipped presets by name (file stem)."""
    if not PRESET_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(PRESET_DIR.glob("*.yaml"))}


def resolve_config(name: str | Path) -> Path:
    """A config path as given, else a shipped preset of that name. Raises UsageError."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    shipped = presets()
    if str(name) in shipped:
        return shipped[str(name)]
    if p.suffix == "" and p.name in shipped:
        return shipped[p.name]
    known = ", ".join(shipped) or "none"
    raise UsageError(f"config {str(name)!r}: no such file, and no shipped preset of that name "
                     f"(presets: {known})")  # fmt: skip


def read_config(path: Path) -> dict[str, Any]:
    """The mapping in ``path``. Raises UsageError naming the file (and line) for bad YAML,
    a top level that is not a mapping, or a key that is not a string."""
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UsageError(f"{path}:{where}: not valid YAML ({problem})") from None
    except RecursionError:
        raise UsageError(f"{path}: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(
            f"{path}: the top level must be a mapping of option names to values, "
            f"not a {type(data).__name__}"
        )
    for key in data:
        if not isinstance(key, str):
            raise UsageError(f"{path}: key {key!r} is not an option name")
    return data
