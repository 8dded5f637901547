"""Where pieval's lm-eval task configs live, for both kinds of install.

The YAMLs sit in the repository's top-level ``tasks/``. The wheel ships them inside the
package as ``pieval/tasks`` (hatchling ``force-include``); an editable install runs the
package from the checkout, where they sit beside it.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def tasks_dir() -> Path:
    """The folder holding pieval's task YAMLs (``pieval/tasks`` or the checkout's ``tasks/``)."""
    shipped = PACKAGE_DIR / "tasks"
    if shipped.is_dir():
        return shipped
    # Beside the package only in a source checkout: a stray top-level ``tasks/`` that some
    # other distribution dropped into site-packages must never be taken for ours.
    checkout = PACKAGE_DIR.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "tasks").is_dir():
        return checkout / "tasks"
    raise FileNotFoundError(
        f"pieval's task folder is missing: looked for {shipped} (wheel install) and "
        f"{checkout / 'tasks'} (source checkout). Reinstall pieval (`pip install pieval` "
        "or `pip install -e .` from the repository)."
    )
