"""The plumbing the notebooks call in one line (moe_lab.notebook_utils, issue 27 item 7): the held-out
sample grouped by domain, the shipped fixtures, a path set in a notebook or the environment, and the
peak-memory measurement that notebook 09 reads from /proc."""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

from moe_lab import notebook_utils as nu
from moe_lab.evalset import load_heldout_sample


def test_heldout_by_domain_groups_the_sample_in_order():
    sample = load_heldout_sample()
    grouped = nu.heldout_by_domain()
    assert sum(map(len, grouped.values())) == len(sample)
    assert list(grouped) == list(dict.fromkeys(r["domain"] for r in sample))  # file order
    for d, texts in grouped.items():
        assert texts == [r["text"] for r in sample if r["domain"] == d]
    two = nu.heldout_by_domain(2)
    assert all(t == grouped[d][:2] for d, t in two.items()) and max(map(len, two.values())) == 2


def test_shipped_fixture(tmp_path):
    path = nu.shipped_fixture("traces", "olmoe_study", "mixtral", "c4_results.jsonl")
    assert path.is_file() and path.parts[-5:-3] == ("fixtures", "traces")
    with pytest.raises(FileNotFoundError, match="no_such_file.jsonl"):
        nu.shipped_fixture("traces", "no_such_file.jsonl")


def test_path_setting(monkeypatch):
    monkeypatch.delenv("MOE_LAB_TEST_PATH", raising=False)
    assert nu.path_setting(None, "MOE_LAB_TEST_PATH") is None
    monkeypatch.setenv("MOE_LAB_TEST_PATH", "~/models/x")
    assert nu.path_setting(None, "MOE_LAB_TEST_PATH") == nu.Path(os.path.expanduser("~/models/x"))
    assert nu.path_setting("/data/y", "MOE_LAB_TEST_PATH") == nu.Path("/data/y")  # the notebook's value wins


def test_peak_growth_reads_the_status_file(tmp_path):
    """On a status file of our own: the growth is VmHWM after minus VmRSS before, in bytes; the reset
    writes 5 to clear_refs."""
    status, clear = tmp_path / "status", tmp_path / "clear_refs"
    status.write_text("Name:\tpython\nVmHWM:\t  5000 kB\nVmRSS:\t  1000 kB\n")
    m = nu.peak_growth(str(status), str(clear))
    with m:
        status.write_text("Name:\tpython\nVmHWM:\t  3000 kB\nVmRSS:\t  2000 kB\n")
    assert m.bytes == (3000 - 1000) * 1024 and m.seconds >= 0 and clear.read_text() == "5"
    with nu.peak_growth(str(tmp_path / "missing"), str(tmp_path / "nodir" / "clear")) as m2:
        pass
    assert m2.bytes is None and m2.seconds >= 0  # elsewhere than Linux: "not measured"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status is Linux's")
def test_peak_growth_sees_an_allocation():
    with nu.peak_growth() as m:
        block = np.ones(64 * 2 ** 20 // 8)  # 64 MiB, touched
        block.sum()
    assert m.bytes is not None and m.bytes >= 48 * 2 ** 20, m.bytes
