"""Small helpers shared by the notebooks: the fast-mode switch, a version banner, plotly set-up,
and the plumbing a learner need not read (finding files, grouping the held-out sample, measuring
peak memory), each called in one line.

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
import time
from importlib import metadata
from pathlib import Path

from .demo import demo_model_dir
from .evalset import load_heldout_sample

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


# ------------------------------------------------------------------------------------------------
# Plumbing the notebooks call in one line (issue 27, item 7)


def shipped_fixture(*parts: str) -> Path:
    """A file or folder under the repository's ``data/fixtures`` (shipped with moe_lab, e.g.
    ``shipped_fixture("traces", "olmoe_study", "mixtral", "c4_results.jsonl")``); a
    FileNotFoundError naming the path when it is not there (an installed package without the data)."""
    path = demo_model_dir().parent.joinpath("fixtures", *parts)
    if not path.exists():
        raise FileNotFoundError(f"shipped fixture {path} not found: moe_lab's data/fixtures comes with the "
                                "repository (git clone), not with a wheel")
    return path


def path_setting(value, env_var: str) -> Path | None:
    """Where the learner's own weights or data live: ``value`` (a path set in the notebook) or else
    the environment variable ``env_var`` (for scripted runs), ``~`` expanded; None when neither is set."""
    chosen = value or os.environ.get(env_var)
    return Path(chosen).expanduser() if chosen else None


def heldout_by_domain(per_domain: int | None = None) -> dict[str, list[str]]:
    """domain -> the texts of the shipped held-out sample (``moe_lab.evalset.load_heldout_sample``:
    held out from the demo model's training corpus and sharing no text with its training split,
    tested), in file order; the first ``per_domain`` of each domain when given."""
    texts: dict[str, list[str]] = {}
    for doc in load_heldout_sample():
        texts.setdefault(doc["domain"], []).append(doc["text"])
    return {d: t[:per_domain] if per_domain else t for d, t in texts.items()}


_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_bytes(key: str, status_file: str = _STATUS) -> int | None:
    """A ``kB`` line of ``/proc/self/status`` (``VmRSS:``, ``VmHWM:``) in bytes; None where there is none."""
    try:
        with open(status_file) as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


class peak_growth:
    """``with peak_growth() as m: ...`` then ``m.bytes`` (the growth of this process' peak resident
    memory over the block: Linux ``VmHWM`` after resetting it to the current RSS through
    ``/proc/self/clear_refs``; None where that is not available) and ``m.seconds`` (wall time)."""

    def __init__(self, status_file: str = _STATUS, clear_refs: str = _CLEAR_REFS):
        self._status, self._clear = status_file, clear_refs
        self.bytes: int | None = None
        self.seconds: float | None = None

    def __enter__(self) -> "peak_growth":
        try:
            with open(self._clear, "w") as f:
                f.write("5")  # VmHWM := current RSS
        except OSError:
            pass
        self.base, self.t0 = _status_bytes("VmRSS:", self._status), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0
        peak = _status_bytes("VmHWM:", self._status)
        self.bytes = None if peak is None or self.base is None else peak - self.base
