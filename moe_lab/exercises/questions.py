"""Graded questions: the interpretive half of an exercise as a multiple-choice or a numeric-range
answer (issue 27, item 2).

A question that teaches ("does it drop?", "which is closer to k?") is graded by one of two shapes:

* :func:`choice`: the learner answers with a letter; each wrong option gets its own explanation
  (the misconception that makes it attractive), never the right letter;
* :func:`in_range`: the learner answers with a number read or computed from the notebook; it passes
  inside a range wide enough to hold whatever demo model the notebook runs (the range is computed
  from the learner's own data where it can be), and a wrong number is told what kind of wrong it
  is (a percentage, the other quantity), never the range.

Where the right option depends on the data (a rate that drops on one model and not on another),
the checker works it out from the learner's trace or model, so a re-trained demo model changes the
right letter, not the grading.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from .arrays import to_number
from .feedback import Feedback, correct, is_todo, todo, wrong


def _key(answer) -> str | None:
    if isinstance(answer, bool):
        return None
    if isinstance(answer, str):
        return answer.strip().strip("()").strip().lower() or None
    return None


def choice(name: str, answer, options: Mapping[str, str], right: str, why_not: Mapping[str, str], *,
           why: str = "", hint: str = "", method: str = "") -> Feedback:
    """Grade a multiple-choice answer: ``answer`` a letter (``"b"``, ``"(b)"``, ``"B"``) among
    ``options`` (letter -> text). ``why_not[letter]`` explains each wrong option without naming the
    right one; ``why`` is shown with a right answer."""
    if right not in options or set(why_not) != set(options) - {right}:
        raise ValueError(f"{name}: right={right!r} must be an option and why_not must cover the others "
                         f"(options {sorted(options)}, why_not {sorted(why_not)})")
    if is_todo(answer):
        return todo(name, hint, method)
    key = _key(answer)
    if key not in options:
        return wrong(name, f"answer with one letter among {', '.join(sorted(options))} (a string such as "
                           f"\"{sorted(options)[0]}\"), found {answer!r}.", hint, method)
    if key == right:
        return correct(name, f"({key}) {options[key]}" + (f" {why}" if why else ""))
    return wrong(name, f"not ({key}): {why_not[key]}", hint, method)


def in_range(name: str, answer, low: float, high: float, *,
             diagnoses: Sequence[tuple[Callable[[float], bool], str]] = (), why: str = "", unit: str = "",
             hint: str = "", method: str = "") -> Feedback:
    """Grade a numeric answer that passes inside [``low``, ``high``]. ``diagnoses``: (test, message)
    pairs tried in order on a wrong value (e.g. "a percentage, not a fraction"); otherwise the
    message says only that the value is outside the accepted range."""
    if not low <= high:
        raise ValueError(f"{name}: low {low} > high {high}")
    if is_todo(answer):
        return todo(name, hint, method)
    value = to_number(answer)
    if value is None:
        return wrong(name, f"answer with one number, found {type(answer).__name__}.", hint, method)
    if low <= value <= high:
        return correct(name, f"{value:.4g}{unit}." + (f" {why}" if why else ""))
    for test, message in diagnoses:
        if test(value):
            return wrong(name, message, hint, method)
    return wrong(name, f"{value:.4g}{unit} is outside the range the measurement allows.", hint, method)


__all__ = ["choice", "in_range"]
