"""The exercise machinery: verdicts, truthiness, require(), display, the two hint levels, the net
that removes a stated reference value, and the "by hand" switch that turns a library function off."""

import numpy as np
import pytest

import moe_lab
from moe_lab import analysis
from moe_lab.exercises import ExerciseError, correct, forbid, is_todo, not_equal, redact, run_by_hand, todo, wrong
from moe_lab.exercises.arrays import mismatch
from moe_lab.exercises.byhand import ForbiddenCall, fresh_trace


def test_verdicts_and_require():
    ok = correct("ex 1")
    bad = wrong("ex 1", "shape is (3,), expected shape (4,)", "use .shape", "compare x.shape with y.shape")
    empty = todo("ex 1", "h")
    assert ok and not bad and not empty
    assert ok.require() is ok
    with pytest.raises(ExerciseError, match=r"expected shape \(4,\)[\s\S]*Hint: use .shape[\s\S]*Still stuck"):
        bad.require()
    with pytest.raises(ExerciseError, match="not answered yet"):
        empty.require()
    assert "✗" in str(bad) and "Hint" in bad._repr_html_() and "Hint" not in ok._repr_html_()
    # the second level is folded away in a notebook
    assert "<details><summary>Still stuck?" in bad._repr_html_() and "Still stuck" not in ok._repr_html_()


def test_is_todo():
    assert is_todo(None) and is_todo(...) and not is_todo(0) and not is_todo([])


@pytest.mark.parametrize("message, leaked", [
    ("expected 0.930077", "0.930077"), ("expected rank 14 of 28, found 1.", "14"),
    ("expected (3, 5) with +1.234; yours adds +0.500.", "(3, 5)"), ("expected [5, 0], found [0, 1].", "[5, 0]"),
    ("document 3, expert 2: expected 0.1234, found 0.5000 (first choice?)", "0.1234"),
    ("expected about 1.213e+10 bytes (12.13 GB), found 1.", "12.13"),
])
def test_a_stated_reference_value_is_removed(message, leaked):
    out = wrong("ex", message).message
    assert leaked not in out and "not equal to the reference" in out


@pytest.mark.parametrize("message", ["expected shape (3, 4), found shape (4,)", "expected a list of 2 expert ids",
                                     "expected one number between 0 and 1, found 'a'"])
def test_a_described_form_is_kept(message):
    assert redact(message) == message


def test_mismatch_never_states_the_reference():
    assert mismatch(0.930077, 0) == "not equal to the reference (beyond the tolerance)"
    msg = mismatch(np.array([0.25, 0.125, 0.625]), np.zeros(3), labels=("expert",))
    assert msg.startswith("not equal: 3 of 3 values differ") and "0.25" not in msg and "0.125" not in msg
    assert mismatch([1.0, 2.0], [1.0, 2.0]) is None and "shape" in mismatch([1.0, 2.0], [1.0])
    assert "not equal" in not_equal("ex", "2 of 8 values differ").message


def test_forbid_switches_a_function_off_everywhere_and_puts_it_back():
    real = analysis.expert_load
    namespace = {"expert_load": real}
    with forbid([real], [namespace]):
        for f in (analysis.expert_load, moe_lab.analysis.stats.expert_load, namespace["expert_load"]):
            with pytest.raises(ForbiddenCall, match="by hand"):
                f(fresh_trace())
    assert analysis.expert_load is real and moe_lab.analysis.stats.expert_load is real
    assert namespace["expert_load"] is real


def test_run_by_hand():
    t = fresh_trace()
    uses_library = lambda trace: analysis.expert_load(trace, "first")  # noqa: E731
    out, bad = run_by_hand("ex", uses_library, (t,), forbidden=[analysis.expert_load])
    assert out is None and bad.status == "wrong" and "calls the library" in bad.message
    assert run_by_hand("ex", lambda trace: None, (t,))[1].status == "todo"
    assert run_by_hand("ex", None)[1].status == "todo"
    assert "takes your function" in run_by_hand("ex", np.zeros(3))[1].message
    assert "ZeroDivisionError" in run_by_hand("ex", lambda trace: 1 / 0, (t,))[1].message
    out, bad = run_by_hand("ex", lambda trace: trace.n_tokens, (t,), forbidden=[analysis.expert_load])
    assert bad is None and out == t.n_tokens
    # the library works again afterwards
    assert np.allclose(analysis.expert_load(t, "first").sum(1), 1)


def test_fresh_trace_is_a_valid_uneven_trace_with_runs():
    t = fresh_trace(n_experts=8)
    assert t.layers == [0, 2, 5] and (t.token_ids[t.positions == 0] == 1).all()
    first = t.expert_ids[:, :, 0]
    assert (first[:, 1:] == first[:, :-1]).mean() > 0.2  # runs: repetition is far from zero
    assert (t.expert_ids[..., 0] != t.expert_ids[..., 1]).all()
