"""What an exercise checker returns: a verdict, what is wrong, and a hint."""

from __future__ import annotations

import html
from dataclasses import dataclass

_MARK = {"correct": "✓", "wrong": "✗", "todo": "…"}
_COLOUR = {"correct": "#1a7f37", "wrong": "#cf222e", "todo": "#9a6700"}


class ExerciseError(Exception):
    """Raised by :meth:`Feedback.require` when an answer is not (yet) right."""


@dataclass(frozen=True)
class Feedback:
    """The result of checking one exercise.

    ``status`` is "correct", "wrong" (with what is wrong in ``message`` and a ``hint``) or "todo"
    (the stub was not filled in). Truthy only when correct.
    """

    exercise: str
    status: str
    message: str
    hint: str = ""

    def __bool__(self) -> bool:
        return self.status == "correct"

    def __str__(self) -> str:
        text = f"{_MARK[self.status]} {self.exercise}: {self.message}"
        return text + (f"\n  Hint: {self.hint}" if self.hint and self.status != "correct" else "")

    __repr__ = __str__

    def _repr_html_(self) -> str:
        hint = (f"<br><b>Hint:</b> {html.escape(self.hint)}"
                if self.hint and self.status != "correct" else "")
        return (f'<div style="border-left:4px solid {_COLOUR[self.status]};padding:4px 8px">'
                f"<b>{_MARK[self.status]} {html.escape(self.exercise)}</b>: "
                f"{html.escape(self.message)}{hint}</div>")

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


def wrong(exercise: str, message: str, hint: str = "") -> Feedback:
    return Feedback(exercise, "wrong", message, hint)


def todo(exercise: str, hint: str = "") -> Feedback:
    return Feedback(exercise, "todo", "not answered yet: replace the None in the cell above.", hint)
