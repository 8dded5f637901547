"""tasks_dir() in each layout it can meet (the real installs are exercised in test_install.py)."""

from __future__ import annotations

import pytest

from pieval import paths


@pytest.fixture
def layout(tmp_path, monkeypatch):
    """site/pieval as the package dir; tests add tasks folders and a pyproject around it."""
    package = tmp_path / "site" / "pieval"
    package.mkdir(parents=True)
    monkeypatch.setattr(paths, "PACKAGE_DIR", package)
    return package


def test_wheel_layout_uses_the_shipped_folder(layout):
    (layout / "tasks").mkdir()
    (layout.parent / "tasks").mkdir()  # even with a checkout-like folder beside it
    (layout.parent / "pyproject.toml").write_text("")
    assert paths.tasks_dir() == layout / "tasks"


def test_checkout_layout_uses_the_folder_beside_the_package(layout):
    (layout.parent / "tasks").mkdir()
    (layout.parent / "pyproject.toml").write_text("")
    assert paths.tasks_dir() == layout.parent / "tasks"


def test_stray_tasks_folder_in_site_packages_is_not_ours(layout):
    (layout.parent / "tasks").mkdir()  # e.g. dropped there by another distribution
    with pytest.raises(FileNotFoundError, match=r"pieval/tasks \(wheel install\).*Reinstall pieval"):
        paths.tasks_dir()


def test_this_checkout():
    assert paths.tasks_dir() == paths.PACKAGE_DIR.parent / "tasks"
