"""Optional dependencies (pyproject's extras): a clear error naming the install command when one
is missing, instead of an ImportError deep inside a command."""

from __future__ import annotations

import importlib.util

# pip name -> import name, for the "demo" extra (the demo, and the benchmark figures).
DEMO = {"scikit-learn": "sklearn", "tqdm": "tqdm", "matplotlib": "matplotlib"}


class MissingExtra(ImportError):
    """An optional dependency a command needs is not installed; the message says how to get it."""


def require(packages: dict[str, str], purpose: str, extra: str = "demo") -> None:
    """Raises MissingExtra, naming `purpose` and the pip command, unless every import name of
    `packages` (pip name -> import name) can be imported.

        >>> require({"tqdm": "tqdm"}, "python -m fastopt demo")  # doctest: +SKIP
    """
    missing = [pip for pip, module in packages.items() if not _importable(module)]
    if missing:
        raise MissingExtra(
            f"{purpose} needs {', '.join(missing)}, not installed here. Install "
            f"{'it' if len(missing) == 1 else 'them'} with:\n"
            f"    pip install {' '.join(missing)}\n"
            f'(or, in fastopt\'s checkout, the "{extra}" extra: '
            f'pip install --no-build-isolation -e ".[{extra}]")'
        )


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
