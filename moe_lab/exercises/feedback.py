"""What an exercise checker returns: a verdict, what kind of wrong it is, and a hint in two levels.

A checker grades: a wrong answer is told *what kind* of wrong it is (a factor of k, the sign, a count
instead of a share, BOS included, ...) or only that it is not equal, never the reference value. As a
safety net, :func:`wrong` removes any "expected <value>" clause a message still carries (see
:func:`redact`), so a checker written the old way does not print the answer either.

Hints come in two levels: ``hint`` is a nudge (shown at once), ``method`` says how to compute it
(folded away in a notebook: "Still stuck?"). Neither is the solution line.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass

_MARK = {"correct": "✓", "wrong": "✗", "todo": "…"}
_COLOUR = {"correct": "#1a7f37", "wrong": "#cf222e", "todo": "#9a6700"}

# "expected 0.1337", "expected rank 14 of 28", "expected [5, 0]", "expected (3, 5) with +1.2",
# "expected about 1.2e+10 bytes (12.13 GB)": a clause that states a reference value, up to the
# next ", found", ";", ": ", sentence end or the end of the message. "expected shape (3, 4)",
# "expected a list of 2 ids", "expected one number" describe a form, not a value, and are kept.
_VALUE_CLAUSE = re.compile(
    r"\bexpected\s+(?:about\s+|rank\s+|channel\s+|value\s+)?[-+−]?[\d(\[{.][^;]*?"
    r"(?=,\s*(?:found|yours|you)\b|\s+found\b|;|:\s|\.\s|\.?$)")


def redact(message: str) -> str:
    """``message`` with every clause that states an expected value replaced by "not equal to the
    reference" (the shared net under every checker's wrong-answer message)."""
    return _VALUE_CLAUSE.sub("not equal to the reference", message)


class ExerciseError(Exception):
    """Raised by :meth:`Feedback.require` when an answer is not (yet) right."""


@dataclass(frozen=True)
class Feedback:
    """The result of checking one exercise.

    ``status`` is "correct", "wrong" (with what kind of wrong in ``message``, a nudge in ``hint`` and
    the method in ``method``) or "todo" (the stub was not filled in). Truthy only when correct.
    """

    exercise: str
    status: str
    message: str
    hint: str = ""
    method: str = ""

    def __bool__(self) -> bool:
        return self.status == "correct"

    def __str__(self) -> str:
        text = f"{_MARK[self.status]} {self.exercise}: {self.message}"
        if self.status != "correct":
            text += f"\n  Hint: {self.hint}" if self.hint else ""
            text += f"\n  Still stuck? {self.method}" if self.method else ""
        return text

    __repr__ = __str__

    def _repr_html_(self) -> str:
        extra = ""
        if self.status != "correct":
            extra += f"<br><b>Hint:</b> {html.escape(self.hint)}" if self.hint else ""
            extra += (f"<details><summary>Still stuck? The method</summary>{html.escape(self.method)}</details>"
                      if self.method else "")
        return (f'<div style="border-left:4px solid {_COLOUR[self.status]};padding:4px 8px">'
                f"<b>{_MARK[self.status]} {html.escape(self.exercise)}</b>: "
                f"{html.escape(self.message)}{extra}</div>")

    def require(self) -> "Feedback":
        """Return self when correct, else raise :class:`ExerciseError` with the feedback."""
        if not self:
            raise ExerciseError(str(self))
        return self


def is_todo(answer) -> bool:
    """True for an unfilled stub: ``None`` or ``...``."""
    return answer is None or answer is Ellipsis


def correct(exercise: str, message: str = "correct.") -> Feedback:
    return Feedback(exercise, "correct", message)


def wrong(exercise: str, message: str, hint: str = "", method: str = "") -> Feedback:
    """A wrong answer: ``message`` says what kind of wrong (any "expected <value>" clause is removed,
    :func:`redact`); ``hint`` is the nudge, ``method`` the second-level hint."""
    return Feedback(exercise, "wrong", redact(message), hint, method)


def not_equal(exercise: str, detail: str = "", hint: str = "", method: str = "") -> Feedback:
    """The wrong answer no diagnosis recognises: "not equal" (with ``detail``, e.g. "3 of 8 values
    differ"), never the reference."""
    return wrong(exercise, "not equal to the reference" + (f": {detail}" if detail else "") + ".", hint, method)


def todo(exercise: str, hint: str = "", method: str = "") -> Feedback:
    return Feedback(exercise, "todo", "not answered yet: replace the None in the cell above.", hint, method)
