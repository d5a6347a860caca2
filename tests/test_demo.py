"""moe_lab.load_demo_model: finds data/tiny-mixtral, one dtype, clear error when missing."""

import pytest
import torch

import moe_lab
from moe_lab import demo


def test_demo_dir_is_repository_data():
    assert demo.demo_model_dir().parts[-2:] == ("data", "tiny-mixtral")
    assert demo.demo_model_dir().parent.parent == __import__("pathlib").Path(moe_lab.__file__).resolve().parent.parent


@pytest.mark.skipif(not demo.demo_model_available(), reason="data/tiny-mixtral not present")
def test_load_demo_model_matches_load_model():
    m = moe_lab.load_demo_model()
    assert m.is_demo and not m.training
    assert {p.dtype for p in m.parameters()} == {torch.float32}
    ref = moe_lab.load_model(demo.demo_model_dir(), dtype=torch.float32)
    tok = torch.tensor([[1, 415, 2936, 9060, 285, 1142]])
    with torch.no_grad():
        torch.testing.assert_close(m(tok), ref(tok), rtol=0, atol=0)


def test_missing_demo_model_raises_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "demo_model_dir", lambda: tmp_path / "data" / "tiny-mixtral")
    with pytest.raises(FileNotFoundError, match="python -m moe_lab.train export"):
        moe_lab.load_demo_model()
    m = moe_lab.load_demo_model(random_if_missing=True)
    assert not m.is_demo and "random" in m.name
    assert next(m.parameters()).dtype == torch.float32
