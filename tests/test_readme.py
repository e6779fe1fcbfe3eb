"""The README's "What is where" table and the public exports it and docs/api.md promise."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _table() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## What is where")
    return text[start : text.index("\n## ", start + 1)]


def test_readme_table_lists_every_package_folder_and_experiment():
    table = _table()
    packages = sorted(
        p.parent.relative_to(ROOT).as_posix()
        for p in (ROOT / "hierprior").rglob("__init__.py")
        if "conf" not in p.parts
    )
    listed = set(re.findall(r"`(hierprior/[\w/]+)/`", table))
    missing = [p for p in packages if p != "hierprior" and p not in listed]
    assert not missing, f"package folders missing from the README's table: {missing}"
    modules = sorted(p.name for p in (ROOT / "hierprior").glob("*.py") if p.name != "__init__.py")
    assert not [m for m in modules if f"`{m}`" not in table and f"`hierprior/{m}`" not in table]
    experiments = sorted(
        p.name + ("/" if p.is_dir() else "")
        for p in (ROOT / "experiments").iterdir()
        if p.is_dir() or p.suffix == ".py"
    )
    missing = [e for e in experiments if f"`{e}`" not in table]
    assert not missing, f"experiments missing from the README's table: {missing}"
    assert "in progress" not in table


def test_lensing_exports_its_perturbers_and_the_latent_model():
    import hierprior.physics.lensing as lensing

    for name in ("LatentMassMap", "PseudoJaffe", "Multipole", "pseudo_jaffe_from_mass"):
        assert name in lensing.__all__ and hasattr(lensing, name), name
