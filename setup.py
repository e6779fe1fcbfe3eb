"""Packaging beyond what pyproject.toml can say: the hydra configs ship inside the package.

``conf/`` stays at the top of the repository (where hydra users expect it) and is installed
as the data-only package ``hierprior.conf`` (``hierprior/conf/**.yaml`` in the wheel), which
``hierprior.config.CONF_DIR`` looks for first; an editable install finds ``<repo>/conf``.
Every other package is found, so a new subpackage of ``hierprior`` is never left out. The
bundled SLACS lenses (``hierprior/data/slacs/``: FITS cut-outs, ``manifest.json``, README) ship as
package data of ``hierprior.data`` (``hierprior.data.load_slacs``), so they work offline.
Everything else (name, dependencies, console scripts) is in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["hierprior", "hierprior.*"]), "hierprior.conf"],
    package_dir={"hierprior.conf": "conf"},
    package_data={
        "hierprior.conf": ["*.yaml", "**/*.yaml"],
        "hierprior.data": ["slacs/*.fits", "slacs/*.json", "slacs/README.md"],
    },
    include_package_data=False,
)
