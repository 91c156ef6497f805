"""The training recipes this package ships, found by name wherever the package is installed.

A clone keeps them in ``configs/shufflenetv2/``, where MindCV keeps its own and where its commands name them.
A wheel carries the same files inside the package, as ``shufflenetv2/configs/`` (``pyproject.toml`` maps the
folder there), so whoever installed with pip can pass ``-c shufflenet_v2_0.5_ascend`` without a clone: before,
the console script had no recipe at all outside one.
"""

from __future__ import annotations

from pathlib import Path

from .errors import ShuffleNetV2Error

_IN_WHEEL = Path(__file__).parent / "configs"
_IN_CLONE = Path(__file__).parent.parent / "configs" / "shufflenetv2"  # also an editable install's


def shipped() -> dict[str, Path]:
    """Each shipped recipe's name (its file name without ``.yaml``) and file, sorted by name."""
    folder = next((f for f in (_IN_WHEEL, _IN_CLONE) if f.is_dir()), None)
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))} if folder else {}


def _name(arg: str | Path) -> str:
    return Path(arg).name.removesuffix(".yaml").removesuffix(".yml")


def find(arg: str | Path) -> Path:
    """The file ``-c`` means: ``arg`` itself when it exists or names a folder, else the shipped recipe ``arg``
    names (with or without ``.yaml``), else ``arg`` (whose reading then fails with ``missing_advice``)."""
    path = Path(arg)
    if path.exists() or len(path.parts) > 1:
        return path
    return shipped().get(_name(arg), path)


def missing_advice(arg: str | Path) -> str:
    """What to pass instead of a config file that does not exist."""
    recipes = shipped()
    if _name(arg) in recipes:  # a clone's path, given where there is no clone
        return f"the shipped recipe of that name is `-c {_name(arg)}`"
    if not recipes:
        return "check the path given to -c/--config"
    return (
        f"check the path given to -c/--config, or name a shipped recipe: {', '.join(recipes)} "
        "(`shufflenetv2 recipes` says what each is for)"
    )


def summary(path: Path) -> str:
    """The first sentence of a recipe's opening comment: what it is for."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("#").strip())
    words = " ".join(lines)
    end = words.find(". ")
    return words if end < 0 else words[: end + 1]


def text(name: str) -> str:
    """The shipped recipe ``name``, as its file holds it, or an error listing the names there are."""
    recipes = shipped()
    if _name(name) not in recipes:
        raise ShuffleNetV2Error(f"no shipped recipe is called {name!r}; there are: {', '.join(recipes) or 'none'}")
    return recipes[_name(name)].read_text(encoding="utf-8")
