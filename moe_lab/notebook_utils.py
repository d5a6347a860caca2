"""Small helpers shared by the notebooks: the fast-mode switch, a version banner, plotly set-up.

Every notebook starts with::

    from moe_lab.notebook_utils import fast_mode, plot_list, print_versions, setup_plotly
    print_versions()
    setup_plotly()
    FAST = fast_mode()  # MOE_LAB_FAST=1: CI sizes

Nothing here is needed by the library itself.
"""

from __future__ import annotations

import os
import platform
import sys
from importlib import metadata

FAST_ENV = "MOE_LAB_FAST"

# While a learner runs a notebook: JupyterLab, Notebook 7 and VS Code draw the plotly mimetype
# (offline, no kernel needed), other viewers the html part, which loads plotly.js from its CDN.
# Nothing beyond plotly is needed. The notebooks saved in the repository are then rewritten by
# scripts/execute_notebooks.py: each figure also gets a static PNG (kaleido) and an html part with
# plotly.js inline once per notebook, so GitHub, printed and offline HTML exports show it too.
DEFAULT_RENDERER = "plotly_mimetype+notebook_connected"

DEFAULT_PACKAGES = ("moe_lab", "torch", "transformers", "numpy", "plotly")

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"", "0", "false", "no", "off"}


def fast_mode() -> bool:
    """True when the environment variable ``MOE_LAB_FAST`` is 1 (CI: small sizes, few steps).

    Unset or 0 means the full notebook for a learner. ``true/false``, ``yes/no`` and ``on/off``
    are accepted too; anything else is an error rather than a silent guess.
    """
    value = os.environ.get(FAST_ENV, "0").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{FAST_ENV}={os.environ[FAST_ENV]!r}: use 1 (fast, CI) or 0 (full)")


def package_versions(packages=DEFAULT_PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None when it is not installed)."""
    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def print_versions(*extra: str, packages=DEFAULT_PACKAGES) -> dict[str, str | None]:
    """Print Python, the platform, package versions and the compute device; return the versions.

    ``extra`` names more distributions to report, e.g. ``print_versions("pandas")``.
    """
    versions = package_versions(tuple(packages) + extra)
    width = max(len(n) for n in ("python", *versions))
    print(f"{'python':<{width}}  {sys.version.split()[0]} ({platform.system()} {platform.machine()})")
    for name, v in versions.items():
        print(f"{name:<{width}}  {v or 'not installed'}")
    try:
        import torch

        device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
        print(f"{'device':<{width}}  {device}, {torch.get_num_threads()} torch threads")
    except ImportError:
        pass
    print(f"{'fast mode':<{width}}  {fast_mode()}  ({FAST_ENV}={os.environ.get(FAST_ENV, '')!r})")
    return versions


def plot_list(values, decimals: int = 4) -> list:
    """A tensor or array as a (nested) list of floats rounded to ``decimals``, for plotly.

    Figures are saved inside the notebook as JSON; float32 values printed with 17 digits would
    make them several times larger than they need to be.
    """
    import numpy as np

    if hasattr(values, "detach"):  # a torch tensor
        values = values.detach().cpu().double().numpy()
    return np.round(np.asarray(values, dtype=float), decimals).tolist()


def setup_plotly(renderer: str = DEFAULT_RENDERER) -> str:
    """Set plotly's default renderer to one that survives saving the notebook; return it.

    The default draws figures from the saved outputs without a kernel: JupyterLab and VS Code
    use the plotly mimetype, other viewers the html part with plotly.js from its CDN (online).
    Pass e.g. ``"notebook"`` to embed plotly.js for fully offline html (about 5 MB per
    notebook), or ``"colab"`` on Google Colab. The repository's saved notebooks carry a PNG and
    offline html as well: ``scripts/execute_notebooks.py`` adds them after running the notebook.
    """
    import plotly.io as pio

    pio.renderers.default = renderer
    return renderer
