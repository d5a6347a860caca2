"""Graded exercises for the notebooks: one checker per exercise, with feedback and a hint.

Each notebook's exercises live in a module named after it (``moe_lab.exercises.nb04`` for notebook
04), one ``check_*`` function per exercise. A notebook cell looks like::

    from moe_lab.exercises import nb04 as ex

    answer = None   # YOUR CODE HERE: the experts token 5 went to in layer 2
    ex.check_token_experts(answer, trace)

A checker grades: a wrong answer is told what kind of wrong it is (a factor of k, the sign, a count
instead of a share, ...) or only "not equal", never the reference value; hints come in two levels
(``hint``, then ``method``). Exercises done "by hand" take the learner's *function*, which the checker
runs on inputs of its own with the library function it replaces switched off (:mod:`.byhand`)::

    def first_choice_load(trace):
        ...  # YOUR CODE HERE

    ex.check_first_choice_load(first_choice_load, trace)

The questions that teach ("does it drop?", "why is the in-domain loss not the test?") are graded too,
two or three per notebook (:mod:`.questions`): a letter for a multiple choice, where each wrong option is
told the misconception behind it, or a number accepted in a range; where the right option depends on
the model, the checker works it out from the learner's trace::

    answer = None   # YOUR CODE HERE: "a", "b", "c" or "d"
    ex.check_baseline_reading(answer)

A checker never raises on a wrong answer: it returns a :class:`Feedback` that shows what is wrong
and a hint (so a notebook still runs top to bottom before the learner has done anything), is
truthy only when the answer is right, and has ``.require()`` for the worked solutions in
``notebooks/solutions/`` (it raises :class:`ExerciseError` with the same message).
"""

from .byhand import ForbiddenCall, forbid, run_by_hand  # noqa: F401
from .feedback import ExerciseError, Feedback, correct, is_todo, not_equal, redact, todo, wrong  # noqa: F401
from .questions import choice, in_range  # noqa: F401
