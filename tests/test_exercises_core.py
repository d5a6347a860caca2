"""The exercise machinery: verdicts, truthiness, require(), display."""

import pytest

from moe_lab.exercises import ExerciseError, correct, is_todo, todo, wrong


def test_verdicts_and_require():
    ok, bad, empty = correct("ex 1"), wrong("ex 1", "shape is (3,), expected (4,)", "use .shape"), todo("ex 1", "h")
    assert ok and not bad and not empty
    assert ok.require() is ok
    with pytest.raises(ExerciseError, match=r"expected \(4,\)[\s\S]*Hint: use .shape"):
        bad.require()
    with pytest.raises(ExerciseError, match="not answered yet"):
        empty.require()
    assert "✗" in str(bad) and "Hint" in bad._repr_html_() and "Hint" not in ok._repr_html_()


def test_is_todo():
    assert is_todo(None) and is_todo(...) and not is_todo(0) and not is_todo([])
