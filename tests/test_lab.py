"""The design-space lab (issue 26): every recipe builds and trains a step, parameters are matched on the
active feed-forward size, upcycling copies the dense function, an interrupted lab resumes to the same
result, a failing recipe is recorded as failed with its reason, and the summaries' intervals."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from moe_lab.lab import MINI, RECIPES, Lab, model_args, non_embedding_params, source_args, train_config, upcycle_state
from moe_lab.lab.summary import causality_leak, interval, paired_difference, summary_table
from moe_lab.model import Mixtral
from moe_lab.train.loop import make_optimizer, training_step

TINY = replace(MINI, steps=4, warmup_steps=1, batch_size=2, seq_len=32)


@pytest.mark.parametrize("name", list(RECIPES))
def test_each_recipe_builds_and_takes_a_step(name):
    cfg = train_config(model_args(name, TINY), TINY, 0, name, RECIPES[name].load_balancing)
    torch.manual_seed(0)
    model = Mixtral(cfg.model).train()
    opt = make_optimizer(model, cfg.optim, torch.device("cpu"))
    x = torch.randint(2, TINY.vocab_size, (2, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    parts, gn, counts = training_step(model, opt, cfg, x[:, :-1], x[:, 1:], 1e-3)
    assert math.isfinite(parts["total"]) and gn > 0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert any("experts" in k for k in changed) and any("attention" in k or "attn" in k for k in changed)
    a = cfg.model
    assert counts.shape == (len(a.moe_layers), a.n_experts)
    if name == "v3_bias":  # the selection bias moved (DeepSeek-V3's rule runs in training forwards)
        assert any(k.endswith("selection_bias") for k in changed)


def test_recipes_match_active_parameters():
    """Every recipe but dense-at-equal-total runs the same feed-forward size per token (up to the
    routers: E * dim per layer); dense-at-equal-total has the Mixtral recipe's total."""
    for scale in (MINI, replace(MINI, dim=64, hidden=128)):
        ref = non_embedding_params(model_args("mixtral_aux", scale))
        router = 32 * scale.dim * scale.n_layers  # at most 32 experts' router rows
        for name in RECIPES:
            p = non_embedding_params(model_args(name, scale))
            if name == "dense_total":
                assert abs(p["total"] - ref["total"]) <= router and p["active"] > 1.3 * ref["active"]
            else:
                assert abs(p["active"] - ref["active"]) <= router, (name, p, ref)
        assert non_embedding_params(model_args("switch_cf1.0", scale))["total"] > 1.3 * ref["total"]


def test_dense_recipe_is_a_dense_ffn():
    """A dense recipe is an MoE of one expert whose weight is exactly 1: the block equals its expert."""
    m = Mixtral(model_args("dense_active", TINY)).eval()
    moe = m.blocks[0].moe
    x = torch.randn(2, 5, TINY.dim)
    torch.testing.assert_close(moe(x)[0], moe.experts[0](x), rtol=0, atol=1e-6)


def test_upcycling_copies_the_dense_function_and_drop_reinitialises_a_share():
    torch.manual_seed(0)
    dense = Mixtral(source_args(TINY)).eval()
    moe = Mixtral(model_args("upcycled", TINY)).eval()
    moe.load_state_dict(upcycle_state(dense.state_dict(), moe, "copy", seed=0))
    x = torch.randint(2, TINY.vocab_size, (2, 16))
    torch.testing.assert_close(moe(x), dense(x), rtol=1e-5, atol=1e-5)  # renormalised top-2 of equal experts
    drop = Mixtral(model_args("drop_upcycled", TINY)).eval()
    drop.load_state_dict(upcycle_state(dense.state_dict(), drop, "drop", 0.5, seed=0))
    w_dense = dense.blocks[0].moe.experts[0].w1.weight
    rows = [(drop.blocks[0].moe.experts[e].w1.weight != w_dense).any(1) for e in range(8)]
    assert all(int(r.sum()) == math.ceil(0.5 * len(r)) for r in rows)  # half the hidden units, in every expert
    assert not torch.equal(rows[0], rows[1])  # a different half per expert
    cols = (drop.blocks[0].moe.experts[0].w2.weight != dense.blocks[0].moe.experts[0].w2.weight).any(0)
    assert torch.equal(cols, rows[0])  # the same units in w1 and w2
    assert not torch.allclose(drop(x), dense(x), atol=1e-3)
    with pytest.raises(ValueError, match="upcycle mode"):
        upcycle_state(dense.state_dict(), moe, "mix")


@pytest.fixture(scope="module")
def lab_dirs(tmp_path_factory):
    return tmp_path_factory.mktemp("lab")


def test_an_interrupted_lab_resumes_to_the_same_result(lab_dirs):
    one = Lab(lab_dirs / "a", lab_dirs / "a_work", TINY, progress=False)
    rows = one.run(["mixtral_aux", "upcycled"], [0])
    assert [r["status"] for r in rows] == ["ok", "ok"], rows
    # interrupted: half the steps done (the checkpoint written at the stop), no row yet
    two = Lab(lab_dirs / "b", lab_dirs / "b_work", TINY, progress=False)
    cfg = train_config(model_args("mixtral_aux", TINY), TINY, 0, "mixtral_aux")
    two._train(cfg, two.run_dir("mixtral_aux", 0), max_steps=2)
    assert not (lab_dirs / "b" / "results.jsonl").exists()
    rows2 = two.run(["mixtral_aux", "upcycled"], [0])
    log = [json.loads(l) for l in (lab_dirs / "b" / "logs" / "mixtral_aux-s0.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "resume" and r["step"] == 2 for r in log)
    for r1, r2 in zip(rows, rows2):
        assert r1["recipe"] == r2["recipe"] and r1["ce"] == pytest.approx(r2["ce"], abs=1e-6)
        assert r1["max_violation"] == pytest.approx(r2["max_violation"], abs=1e-9)
    # a finished lab reruns nothing
    assert len(two.run(["mixtral_aux", "upcycled"], [0])) == 2


def test_a_failing_recipe_is_recorded_with_its_reason(lab_dirs, monkeypatch):
    lab = Lab(lab_dirs / "f", lab_dirs / "f_work", replace(TINY, lr=1e6, warmup_steps=0), progress=False)
    calls = []
    real = Lab.run_one

    def oom_on_switch(self, name, seed):
        calls.append(name)
        if name == "switch_cf1.0":
            raise RuntimeError("CPU out of memory (simulated)")
        return real(self, name, seed)

    monkeypatch.setattr(Lab, "run_one", oom_on_switch)
    rows = {r["recipe"]: r for r in lab.run(["switch_cf1.0", "mixtral_aux"], [0])}
    assert rows["switch_cf1.0"]["status"] == "failed" and "out of memory" in rows["switch_cf1.0"]["reason"]
    # lr 1e6 diverges: recorded as failed, with the held-out CE it reached
    assert rows["mixtral_aux"]["status"] == "failed" and "Diverged" in rows["mixtral_aux"]["reason"], rows["mixtral_aux"]
    table = summary_table(list(rows.values()))
    assert table.loc["switch_cf1.0", "seeds_ok"] == 0 and "out of memory" in table.loc["switch_cf1.0", "failed"]
    with pytest.raises(ValueError, match="unknown recipes"):
        lab.run(["nope"])


def test_intervals_and_paired_differences():
    m, lo, hi = interval([1.0, 2.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(4.303 * 1.0 / math.sqrt(3), rel=1e-6) and m - lo == hi - m
    rows = [{"recipe": "a", "seed": s, "status": "ok", "ce": 3.0 + 0.01 * s} for s in range(3)]
    rows += [{"recipe": "b", "seed": s, "status": "ok", "ce": 3.1 + 0.01 * s + 0.001 * (s == 1)} for s in range(3)]
    d = paired_difference(rows, "a", "b")
    assert d["n"] == 3 and d["diff"] == pytest.approx(-0.1 - 0.001 / 3) and d["beyond_noise"]
    rows.append({"recipe": "b", "seed": 3, "status": "failed", "reason": "x"})
    assert paired_difference(rows, "a", "b")["n"] == 3


def test_expert_choice_leaks_the_future_token_choice_does_not():
    torch.manual_seed(0)
    x = torch.randint(2, TINY.vocab_size, (3, 32))
    for name in ("mixtral_aux", "switch_cf1.0", "v3_bias"):
        assert causality_leak(Mixtral(model_args(name, TINY)).eval(), x, 3)["share_earlier_changed"] == 0.0
    leak = causality_leak(Mixtral(model_args("expert_choice", TINY)).eval(), x, 3)
    assert leak["share_earlier_changed"] > 0.01 and leak["earlier_tokens"] > 0


def test_measure_again_fills_the_empty_slot_statistics_without_training(lab_dirs):
    """`python -m moe_lab.lab measure`: a finished capacity run is measured again from its final
    checkpoint (no optimiser step: the checkpoint and the recorded CE are unchanged), and its vocabulary
    specialisation and router saturation are filled in, with chance levels from the filled slots."""
    from moe_lab.lab.run import snapshot_ids

    lab = Lab(lab_dirs / "m", lab_dirs / "m_work", TINY, progress=False)
    [row] = lab.run(["switch_cf1.0"], [0])
    assert row["status"] == "ok" and row["dropped_share"] > 0
    ckpt = lab_dirs / "m_work" / "switch_cf1.0-s0" / "checkpoint.pt"
    before = ckpt.stat().st_mtime_ns
    # an old row (written before empty slots were measured) and an old uint8 snapshot file (-1 stored as 255)
    old = {k: v for k, v in row.items() if not k.startswith(("vocab_", "router_saturation"))}
    (lab_dirs / "m" / "results.jsonl").write_text(json.dumps(old) + "\n")
    snap = lab_dirs / "m_work" / "switch_cf1.0-s0" / "router_snapshots.npz"
    z = dict(np.load(snap))
    assert (z["indices"] < 0).any()
    z["indices"] = z["indices"].astype(np.uint8)
    np.savez(snap, **z)
    np.testing.assert_array_equal(snapshot_ids(z["indices"], 8), np.load(snap)["indices"].astype(np.int8))
    lab.measure_again(["switch_cf1.0"], [0])  # what `python -m moe_lab.lab measure` calls
    [new] = lab.rows()
    assert ckpt.stat().st_mtime_ns == before and new["ce"] == row["ce"] and new["steps"] == TINY.steps
    assert new["vocab_specialization"] == pytest.approx(row["vocab_specialization"])
    assert new["router_saturation_mid"] == pytest.approx(row["router_saturation_mid"])
    assert 0 < new["router_saturation_final"] < 1  # the ceiling: the empty slots never match
    assert new["vocab_specialization_chance"] == pytest.approx(new["experts_per_token"] / 8)
    assert "remeasured" in new and new["wall_s"] == row["wall_s"]
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        lab.remeasure("expert_choice", 0)
