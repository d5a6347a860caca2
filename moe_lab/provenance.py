"""Where a number comes from: a real model or trace, the demo model, or a synthetic fixture.

A notebook that falls back to the demo model or to a shipped fixture when the real weights or
traces are missing runs the *same code*, so its figures and tables look like the real ones. Every
exhibit computed on a stand-in must say so, and the paper's columns must not sit beside synthetic
numbers. To make that mechanical rather than hand-typed, the label travels with the data:

* :func:`provenance` reads it from a trace (``meta["provenance"]``, or a trace file inside the
  repository's ``data/fixtures``: the shipped fixtures are synthetic), a model (``model.is_demo``
  from :func:`moe_lab.load_demo_model`, or a ``provenance`` attribute), a
  :class:`~moe_lab.analysis.Prefetch` or a DataFrame's ``attrs["source"]``;
* :func:`mark` writes it onto a trace or model (the one place where a fallback is chosen);
* :func:`headline` / :func:`is_stand_in` turn it into the words a title, caption or print uses;
  :func:`moe_lab.viz.stamp` puts them into a figure's title.

Labels: :data:`SYNTHETIC_FIXTURE`, :data:`DEMO_MODEL`, :data:`RANDOM_MODEL`, or a free text
naming a real source (``"Mixtral 8x7B"``); ``""`` means unknown (treated as real: nothing is
stamped).
"""

from __future__ import annotations

from pathlib import Path

from .demo import demo_model_dir

__all__ = ["SYNTHETIC_FIXTURE", "DEMO_MODEL", "RANDOM_MODEL", "STAND_INS", "provenance", "mark", "is_stand_in",
           "headline"]

SYNTHETIC_FIXTURE = "synthetic fixture"
DEMO_MODEL = "demo model"
RANDOM_MODEL = "random untrained model"
#: labels of data that say nothing about a real MoE
STAND_INS = (SYNTHETIC_FIXTURE, DEMO_MODEL, RANDOM_MODEL)


def _fixtures_dir() -> Path:
    return (demo_model_dir().parent / "fixtures").resolve()


def _in_fixtures(path) -> bool:
    try:
        return Path(path).expanduser().resolve().is_relative_to(_fixtures_dir())
    except (OSError, TypeError, ValueError):
        return False


def provenance(obj) -> str:
    """The source label of ``obj``: a str (returned as is), a RoutingTrace / TraceStore (its
    ``meta``), a model (moe_lab or transformers), a Prefetch, a DataFrame (``attrs["source"]``),
    or None (``""``)."""
    if obj is None:
        return ""
    if isinstance(obj, str):
        return obj
    label = getattr(obj, "provenance", None)
    if isinstance(label, str):
        return label
    attrs = getattr(obj, "attrs", None)
    if isinstance(attrs, dict) and isinstance(attrs.get("source"), str):
        return attrs["source"]
    meta = getattr(obj, "meta", None)
    if isinstance(meta, dict):
        if isinstance(meta.get("provenance"), str):
            return meta["provenance"]
        files = [meta.get("file")] + list(meta.get("files") or []) + [meta.get("checkpoint")]
        if any(f and _in_fixtures(f) for f in files):
            return SYNTHETIC_FIXTURE
        return ""
    is_demo = getattr(obj, "is_demo", None)
    if is_demo is True:
        return DEMO_MODEL
    if is_demo is False:
        return RANDOM_MODEL
    return ""


def mark(obj, label):
    """Write ``label`` (a label or anything :func:`provenance` reads) onto a trace (``meta``) or a
    model (an attribute); returns ``obj``. Traces selected or concatenated from it keep it."""
    label = provenance(label)
    meta = getattr(obj, "meta", None)
    if isinstance(meta, dict):
        meta["provenance"] = label
    else:
        try:
            obj.provenance = label
        except AttributeError as e:
            raise TypeError(f"cannot mark a {type(obj).__name__} with a provenance: give a RoutingTrace or a "
                            "model") from e
    return obj


def is_stand_in(obj) -> bool:
    """True for the demo model, a random model or a synthetic fixture: numbers that say nothing
    about a real MoE (and must not be set beside a paper's)."""
    return provenance(obj) in STAND_INS


def headline(obj, what: str = "") -> str:
    """``"SYNTHETIC FIXTURE: what"`` / ``"DEMO MODEL: what"`` for a stand-in, ``"what"`` (with
    the real source in parentheses when known) otherwise: the words for a title or a print."""
    label = provenance(obj)
    if label in STAND_INS:
        return f"{label.upper()}: {what}" if what else label.upper()
    if label:
        return f"{what} ({label})" if what else label
    return what
