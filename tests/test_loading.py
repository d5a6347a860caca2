"""load_model / save_model: every layout round trip, and every error with a clear message.

Tiny random models (conftest.TINY_CONFIGS); fp32 logits must agree to 1e-5 and the chosen
experts must be identical in every round trip.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import CONFIG_IDS, TINY_CONFIGS, make_model, random_tokens
from moe_lab import CheckpointError, load_model, save_model
from moe_lab.checkpoints.files import MissingFileError, parse_size
from moe_lab.checkpoints.convert import hf_config_dict, to_hf_state_dict
from moe_lab.checkpoints.layouts import params_dict, to_mistral_state_dict
from moe_lab.checkpoints.loading import describe_checkpoint

ATOL = 1e-5


# --------------------------------------------------------------------------------------------
# helpers


def routing(model, tokens) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits and each layer's chosen experts (N, k), captured at the hook points."""
    chosen, handles = [], []
    for block in model.blocks:
        handles.append(block.moe.hook_topk_indices.register_forward_hook(lambda m, i, o: chosen.append(o.clone())))
    try:
        with torch.no_grad():
            logits = model(tokens)
    finally:
        for h in handles:
            h.remove()
    return logits, chosen


def hf_routing(hf, tokens, top_k):
    with torch.no_grad():
        out = hf(tokens, output_router_logits=True)
    return out.logits, [l.float().softmax(-1).topk(top_k, dim=-1).indices for l in out.router_logits]


def assert_same(model, ref, tokens, atol=ATOL):
    logits, chosen = routing(model, tokens)
    ref_logits, ref_chosen = routing(ref, tokens)
    torch.testing.assert_close(logits, ref_logits, atol=atol, rtol=0)
    assert len(chosen) == len(ref_chosen)
    for a, b in zip(chosen, ref_chosen):
        assert torch.equal(a, b)


def write_release_layout(model, root: Path, n_files: int = 4) -> Path:
    """The Dec-2023 Mistral release by hand: params.json + consolidated.00.pt .. with stacked
    experts, layers spread over the files, embeddings in the first and the head in the last."""
    root.mkdir(parents=True, exist_ok=True)
    args = model.args
    sd = to_mistral_state_dict(model.state_dict(), args, stacked=True)
    parts = [dict() for _ in range(n_files)]
    for k, v in sd.items():
        if k.startswith("layers."):
            i = int(k.split(".")[1]) * n_files // args.n_layers
        else:
            i = 0 if k.startswith("tok_") else n_files - 1
        parts[i][k] = v.clone()
    for i, part in enumerate(parts):
        torch.save(part, root / f"consolidated.{i:02d}.pt")
    params = params_dict(args)
    params.pop("rope_theta") if args.rope_theta == 1e6 else None  # like the real file: absent means 1e6
    params.pop("max_seq_len")
    (root / "params.json").write_text(json.dumps(params))
    return root


@pytest.fixture(scope="module")
def model():
    return make_model(TINY_CONFIGS[1], seed=3)


@pytest.fixture(scope="module")
def tokens():
    return random_tokens(TINY_CONFIGS[1], 2, 12, seed=1)


@pytest.fixture(scope="module")
def hf_dir(model, tmp_path_factory):
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "hf")


@pytest.fixture(scope="module")
def sharded_dir(model, tmp_path_factory):
    return save_model(model, tmp_path_factory.mktemp("ckpt") / "hf-sharded", max_shard_size="60KB")


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------------------------
# round trips


@pytest.mark.parametrize("args", TINY_CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("shard", [None, "40KB"], ids=["single", "sharded"])
def test_moe_lab_to_hf_dir_to_transformers(args, shard, tmp_path):
    transformers = pytest.importorskip("transformers")
    m = make_model(args, seed=1)
    tok = random_tokens(args, 2, 12)
    path = save_model(m, tmp_path / "hf", max_shard_size=shard)
    names = sorted(os.listdir(path))
    if shard:
        assert "model.safetensors.index.json" in names and len([n for n in names if n.startswith("model-")]) > 1
    else:
        assert names == ["config.json", "model.safetensors"]
    hf = transformers.MixtralForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    hf_logits, hf_chosen = hf_routing(hf, tok, args.experts_per_token)
    logits, chosen = routing(m, tok)
    torch.testing.assert_close(hf_logits, logits, atol=ATOL, rtol=0)
    for a, b in zip(hf_chosen, chosen):
        assert torch.equal(a, b)
    # ... and back into moe_lab
    assert_same(load_model(path), m, tok)


@pytest.mark.parametrize("args", TINY_CONFIGS[:2], ids=CONFIG_IDS[:2])
@pytest.mark.parametrize("original_format", [True, False], ids=["hub-names", "v5-fused-names"])
def test_transformers_save_pretrained_to_moe_lab(args, original_format, tmp_path):
    pytest.importorskip("transformers")
    from moe_lab.checkpoints.convert import to_hf_model

    m = make_model(args, seed=2)
    hf = to_hf_model(m)
    hf.save_pretrained(tmp_path / "hf", save_original_format=original_format)
    keys = load_file(tmp_path / "hf" / "model.safetensors").keys()
    assert any("gate_up_proj" in k for k in keys) != original_format
    tok = random_tokens(args, 2, 10)
    loaded = load_model(tmp_path / "hf")
    hf_logits, hf_chosen = hf_routing(hf, tok, args.experts_per_token)
    logits, chosen = routing(loaded, tok)
    torch.testing.assert_close(logits, hf_logits, atol=ATOL, rtol=0)
    for a, b in zip(chosen, hf_chosen):
        assert torch.equal(a, b)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_file_with_transformers_v5_names(model, tokens, suffix, tmp_path):
    """A state dict with v5 in-memory names (fused experts) next to a config.json."""
    sd = {k: v.contiguous() for k, v in to_hf_state_dict(model.state_dict(), model.args, fused=True).items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd
    f = tmp_path / f"weights{suffix}"
    torch.save(sd, f) if suffix == ".pt" else save_file(sd, f)
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(model.args)))
    assert describe_checkpoint(f).style == "hf-fused"
    assert_same(load_model(f), model, tokens)


@pytest.mark.parametrize("args", TINY_CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("shard", [None, "30KB"], ids=["single", "sharded"])
def test_moe_lab_to_mistral_to_moe_lab(args, shard, tmp_path):
    m = make_model(args, seed=4)
    path = save_model(m, tmp_path / "mistral", layout="mistral", max_shard_size=shard)
    names = sorted(os.listdir(path))
    assert "params.json" in names
    assert ("consolidated.safetensors" in names) == (shard is None)
    params = json.loads((path / "params.json").read_text())
    assert params["moe"] == {"num_experts": args.n_experts, "num_experts_per_tok": args.experts_per_token}
    loaded = load_model(path)
    # params.json holds the architecture; training-only fields (init_std, loss coefs) take defaults
    assert loaded.args == m.args.replace(init_std=0.02, router_aux_loss_coef=0.02)
    assert_same(loaded, m, random_tokens(args, 2, 12))


def test_mistral_consolidated_pth(model, tokens, tmp_path):
    torch.save({k: v.clone() for k, v in to_mistral_state_dict(model.state_dict(), model.args).items()},
               tmp_path / "consolidated.00.pth")
    (tmp_path / "params.json").write_text(json.dumps(params_dict(model.args)))
    info = describe_checkpoint(tmp_path)
    assert (info.kind, info.style) == ("mistral", "mistral")
    assert_same(load_model(tmp_path), model, tokens)


@pytest.mark.parametrize("args", TINY_CONFIGS, ids=CONFIG_IDS)
def test_mistral_release_layout(args, tmp_path):
    """consolidated.00.pt .. with stacked experts (w2 transposed), merged like a dict update."""
    m = make_model(args, seed=5)
    root = write_release_layout(m, tmp_path / "release")
    keys = torch.load(root / "consolidated.00.pt", weights_only=True).keys()
    assert "layers.0.block_sparse_moe.w1" in keys and "tok_embeddings.weight" in keys
    info = describe_checkpoint(root)
    assert info.style == "mistral-stacked" and len(info.files) == 4
    loaded = load_model(root)
    assert loaded.args.rope_theta == args.rope_theta
    assert_same(loaded, m, random_tokens(args, 2, 12))


def test_params_json_without_rope_theta_means_1e6(model, tmp_path):
    root = write_release_layout(model.to(torch.float32), tmp_path / "r")
    params = json.loads((root / "params.json").read_text())
    assert "rope_theta" not in params and model.args.rope_theta == 1e6
    assert load_model(root).args.rope_theta == 1e6


def test_hf_config_variants(model, tokens, hf_dir, tmp_path):
    """rope_theta only inside rope_parameters (v5), or only at top level (v4); head_dim null."""
    for variant in ("v5", "v4"):
        d = copy(hf_dir, tmp_path / variant)
        cfg = json.loads((d / "config.json").read_text())
        if variant == "v5":
            cfg.pop("rope_theta")
        else:
            cfg.pop("rope_parameters")
        (d / "config.json").write_text(json.dumps(cfg))
        assert_same(load_model(d), model, tokens)
    args = TINY_CONFIGS[0]  # head_dim == dim // n_heads
    m = make_model(args)
    d = save_model(m, tmp_path / "nullhd")
    cfg = json.loads((d / "config.json").read_text())
    cfg["head_dim"] = None
    (d / "config.json").write_text(json.dumps(cfg))
    assert load_model(d).args.head_dim == args.dim // args.n_heads


def test_moe_lab_state_dict_with_args(model, tokens, tmp_path):
    f = tmp_path / "sd.pt"
    torch.save(model.state_dict(), f)
    with pytest.raises(MissingFileError, match="args=ModelArgs"):
        load_model(f)
    assert_same(load_model(f, args=model.args), model, tokens)


def test_path_can_be_a_file_in_the_checkpoint(model, tokens, hf_dir, sharded_dir):
    assert_same(load_model(hf_dir / "config.json"), model, tokens)
    assert_same(load_model(hf_dir / "model.safetensors"), model, tokens)
    assert_same(load_model(sharded_dir / "model.safetensors.index.json"), model, tokens)


def test_sharded_files_and_index(model, sharded_dir):
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and all((sharded_dir / f).exists() for f in files)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert set(index["weight_map"]) == set(to_hf_state_dict(model.state_dict(), model.args))


def test_hf_layout_stores_q_k_rotate_half_order(model, hf_dir):
    from moe_lab.checkpoints.convert import half_to_interleaved, interleaved_to_half

    sd = load_file(hf_dir / "model.safetensors")
    wq = model.blocks[0].attn.wq.weight
    q = sd["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(q, wq)
    assert torch.equal(q, interleaved_to_half(wq, model.args.n_heads))
    assert torch.equal(half_to_interleaved(q, model.args.n_heads), wq)
    assert torch.equal(sd["model.layers.0.self_attn.v_proj.weight"], model.blocks[0].attn.wv.weight)


def test_dtype_on_load(model, hf_dir, tokens):
    m16 = load_model(hf_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in m16.parameters()} == {torch.bfloat16}
    ref = model.state_dict()
    for k, v in m16.state_dict().items():
        assert torch.equal(v, ref[k].to(torch.bfloat16)), k
    assert m16(tokens).dtype == torch.bfloat16
    assert load_model(hf_dir, dtype="bf16").output.weight.dtype == torch.bfloat16
    # and a bf16 checkpoint loads as bf16 by default, as fp32 on request
    p = save_model(m16, hf_dir.parent / "bf16")
    assert json.loads((p / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_model(p).output.weight.dtype == torch.bfloat16
    assert load_model(p, dtype=torch.float32).output.weight.dtype == torch.float32


def test_parameters_are_plain_memory_not_file_maps(hf_dir):
    """Each parameter owns its memory (one copy); nothing shares storage with another tensor."""
    m = load_model(hf_dir)
    ptrs = [p.untyped_storage().data_ptr() for p in m.parameters()]
    assert len(set(ptrs)) == len(ptrs)
    assert all(p.is_contiguous() and p.requires_grad for p in m.parameters())
    assert all(p.device.type == "cpu" for p in m.parameters())


def hidden_after(model, tokens, n):
    out = {}
    h = model.blocks[n - 1].hook_resid_post.register_forward_hook(lambda m, i, o: out.setdefault("x", o.clone()))
    try:
        model(tokens)
    finally:
        h.remove()
    return out["x"]


@pytest.mark.parametrize("layout", ["hf", "release"])
def test_layers_subset(model, tokens, layout, hf_dir, tmp_path):
    path = hf_dir if layout == "hf" else write_release_layout(model, tmp_path / "rel")
    sub = load_model(path, layers=1)
    assert sub.args.n_layers == 1 and len(sub.blocks) == 1 and sub.layer_ids == [0]
    torch.testing.assert_close(hidden_after(sub, tokens, 1), hidden_after(model, tokens, 1), atol=ATOL, rtol=0)
    # a list: blocks in that order, each with its layer's weights
    sub = load_model(path, layers=[1, 0])
    assert sub.layer_ids == [1, 0]
    full = model.state_dict()
    for i, L in enumerate([1, 0]):
        for k, v in sub.blocks[i].state_dict().items():
            assert torch.equal(v, full[f"blocks.{L}.{k}"]), k
    x = model.tok_embeddings(tokens)
    x2 = sub.tok_embeddings(tokens)
    torch.testing.assert_close(x, x2)
    sub_r = load_model(path, layers=range(2))
    assert sub_r.layer_ids == [0, 1]
    torch.testing.assert_close(sub_r(tokens), model(tokens), atol=ATOL, rtol=0)


@pytest.mark.parametrize("bad", [0, 3, -1, [0, 2], [-1], [], [1, 1], "two"])
def test_layers_out_of_range(hf_dir, bad):
    with pytest.raises(CheckpointError, match="layer"):
        load_model(hf_dir, layers=bad)


def test_describe_checkpoint(model, sharded_dir):
    info = describe_checkpoint(sharded_dir)
    assert info.kind == "hf" and info.style == "hf" and info.index_file.name == "model.safetensors.index.json"
    assert info.args == model.args
    assert info.nbytes == sum(v.numel() * 4 for v in model.state_dict().values())
    assert "model.embed_tokens.weight" in info.table()


# --------------------------------------------------------------------------------------------
# saving


def test_parse_size():
    assert parse_size("10MB") == 10_000_000 and parse_size("1.5GB") == 1_500_000_000
    assert parse_size("2KiB") == 2048 and parse_size(123) == 123 and parse_size(None) is None
    for bad in ("10 parsecs", "-1", 0, "MB", True):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_save_is_atomic(model, tmp_path, monkeypatch):
    from moe_lab.checkpoints import files as st  # its writer of one .safetensors file

    real, calls = st.save_aligned_safetensors, []

    def failing(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # second shard: write half a file, then fail like a full disk would
            Path(filename).write_bytes(b"\x00" * 100)
            raise OSError(28, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_aligned_safetensors", failing)
    target = tmp_path / "ckpt"
    with pytest.raises(OSError, match="No space"):
        save_model(model, target, max_shard_size="60KB")
    assert not target.exists()
    assert os.listdir(tmp_path) == []  # no temp directory left behind
    # an existing checkpoint survives a failed overwrite untouched
    monkeypatch.setattr(st, "save_aligned_safetensors", real)
    save_model(model, target, layout="mistral")
    before = sorted(os.listdir(target))
    calls.clear()
    monkeypatch.setattr(st, "save_aligned_safetensors", failing)
    with pytest.raises(OSError):
        save_model(model, target, max_shard_size="60KB")
    assert sorted(os.listdir(target)) == before and sorted(os.listdir(tmp_path)) == ["ckpt"]
    monkeypatch.setattr(st, "save_aligned_safetensors", real)
    load_model(target)  # still valid
    # a successful save replaces it (hf files now, no leftover mistral files)
    save_model(model, target)
    assert sorted(os.listdir(target)) == ["config.json", "model.safetensors"]


def test_save_refuses_to_replace_a_foreign_directory(model, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="thesis.tex"):
        save_model(model, tmp_path / "notes")
    assert (tmp_path / "notes" / "thesis.tex").read_text() == "precious"


def test_save_meta_model_fails(tmp_path):
    from moe_lab.checkpoints.layouts import meta_model

    with pytest.raises(CheckpointError, match="meta"):
        save_model(meta_model(TINY_CONFIGS[0]), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_save_model_with_shared_storage(tmp_path):
    """A model whose expert weights are views of one tensor (from_hf_model) still saves."""
    pytest.importorskip("transformers")
    from moe_lab.checkpoints.convert import from_hf_model, to_hf_model

    m = make_model(TINY_CONFIGS[0])
    m2 = from_hf_model(to_hf_model(m))
    p = save_model(m2, tmp_path / "c", max_shard_size="50KB")
    tok = random_tokens(TINY_CONFIGS[0], 1, 8)
    assert_same(load_model(p), m, tok)


# --------------------------------------------------------------------------------------------
# errors: each names the file and the keys


def test_missing_shard(sharded_dir, tmp_path):
    d = copy(sharded_dir, tmp_path / "d")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink(missing_ok=True)
    with pytest.raises(MissingFileError, match=shard.name) as e:
        load_model(d)
    assert "model.safetensors.index.json" in str(e.value) and "holding" in str(e.value)
    # without an index, the shard set itself shows the gap
    (d / "model.safetensors.index.json").unlink()
    with pytest.raises(MissingFileError, match=f"missing shard.*{shard.name}"):
        load_model(d)


def test_missing_release_shard(model, tmp_path):
    root = write_release_layout(model, tmp_path / "rel")
    (root / "consolidated.01.pt").unlink()
    with pytest.raises(MissingFileError, match=r"consolidated\.01\.pt"):
        load_model(root)
    (root / "consolidated.03.pt").unlink()  # the last one gone: the layers it held are missing
    (root / "consolidated.02.pt").rename(root / "consolidated.01.pt")
    with pytest.raises(CheckpointError, match="layers 0..0|missing keys"):
        load_model(root)


def test_index_points_to_missing_file(sharded_dir, tmp_path):
    d = copy(sharded_dir, tmp_path / "d")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-99999-of-99999.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MissingFileError, match=r"model-99999-of-99999\.safetensors.*model\.norm\.weight"):
        load_model(d)


def test_index_disagrees_with_shards(sharded_dir, tmp_path):
    d = copy(sharded_dir, tmp_path / "d")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    wm = index["weight_map"]
    key = next(k for k, f in wm.items() if list(wm.values()).count(f) > 1)  # its file stays in use
    fn = wm[key]
    other = next(f for f in sorted(set(wm.values())) if f != fn)
    wm[key] = other
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"{re.escape(key)}.*index says {other}, found in {fn}"):
        load_model(d)


def _rewrite(path: Path, edit):
    sd = load_file(path)
    edit(sd)
    save_file(sd, path, metadata={"format": "pt"})


def test_missing_keys(hf_dir, tmp_path):
    d = copy(hf_dir, tmp_path / "d")
    gone = ["model.layers.1.self_attn.k_proj.weight", "model.layers.0.block_sparse_moe.experts.3.w2.weight"]
    _rewrite(d / "model.safetensors", lambda sd: [sd.pop(k) for k in gone])
    with pytest.raises(CheckpointError, match="missing keys") as e:
        load_model(d)
    assert all(k in str(e.value) for k in gone) and "model.safetensors" in str(e.value)


def test_unexpected_keys(hf_dir, tmp_path):
    d = copy(hf_dir, tmp_path / "d")
    _rewrite(d / "model.safetensors", lambda sd: sd.update({"model.layers.0.mystery.weight": torch.zeros(3),
                                                              "extra_head.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match="unexpected keys") as e:
        load_model(d)
    assert "model.layers.0.mystery.weight" in str(e.value) and "extra_head.weight" in str(e.value)
    # RoPE tables some exporters leave behind are not weights: ignored
    d2 = copy(hf_dir, tmp_path / "d2")
    _rewrite(d2 / "model.safetensors", lambda sd: sd.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4)}))
    load_model(d2)


def test_duplicated_keys(model, tmp_path):
    """The same key in two shards (no index to arbitrate)."""
    d = save_model(model, tmp_path / "d", max_shard_size="60KB")
    (d / "model.safetensors.index.json").unlink()
    first, last = sorted(d.glob("model-*.safetensors"))[0], sorted(d.glob("model-*.safetensors"))[-1]
    dup = next(iter(load_file(first)))
    _rewrite(last, lambda sd: sd.update({dup: load_file(first)[dup]}))
    with pytest.raises(CheckpointError, match="duplicated keys") as e:
        load_model(d)
    assert dup in str(e.value) and first.name in str(e.value) and last.name in str(e.value)


def test_shape_mismatch(hf_dir, tmp_path):
    d = copy(hf_dir, tmp_path / "d")
    key = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    _rewrite(d / "model.safetensors", lambda sd: sd.update({key: sd[key][:-1].clone()}))
    I, D = TINY_CONFIGS[1].hidden_dim, TINY_CONFIGS[1].dim
    with pytest.raises(CheckpointError, match="shape mismatch") as e:
        load_model(d)
    msg = str(e.value)
    assert key in msg and f"expected [{I}, {D}], found [{I - 1}, {D}]" in msg and "model.safetensors" in msg


def test_truncated_safetensors(hf_dir, tmp_path):
    d = copy(hf_dir, tmp_path / "d")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as e:
        load_model(d)
    assert str(f) in str(e.value) and "tensors cut off" in str(e.value)
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="too short"):
        load_model(d)


def test_corrupt_safetensors(hf_dir, tmp_path):
    d = copy(hf_dir, tmp_path / "d")
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[20:40] = b"#" * 20  # garble the JSON header
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt") as e:
        load_model(d)
    assert str(f) in str(e.value)


def test_corrupt_torch_file(model, tmp_path):
    root = write_release_layout(model, tmp_path / "rel")
    f = root / "consolidated.02.pt"
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=r"consolidated\.02\.pt.*(truncated|corrupt)"):
        load_model(root)


def test_unknown_layout(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "picture.png").write_bytes(b"\x89PNG")
    with pytest.raises(CheckpointError, match="unknown checkpoint layout") as e:
        load_model(tmp_path)
    assert "notes.txt" in str(e.value) and "config.json" in str(e.value)
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        load_model(tmp_path / "notes.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nothing-here")


def test_weights_without_config_and_config_without_weights(hf_dir, tmp_path):
    d = copy(hf_dir, tmp_path / "d")
    (d / "config.json").unlink()
    with pytest.raises(MissingFileError, match="config.json"):
        load_model(d)
    d2 = copy(hf_dir, tmp_path / "d2")
    (d2 / "model.safetensors").unlink()
    with pytest.raises(MissingFileError, match="no weights"):
        load_model(d2)


@pytest.mark.parametrize("field,value,words", [
    ("hidden_size", 64, "hidden_size=64.*columns"),
    ("num_hidden_layers", 3, "num_hidden_layers=3.*layers 0..1"),
    ("num_local_experts", 4, "num_local_experts=4.*8 rows"),
    ("vocab_size", 100, "vocab_size=100"),
    ("intermediate_size", 81, r"shape mismatch.*expected \[81, 48\], found \[80, 48\]"),
])
def test_config_disagrees_with_weights(hf_dir, tmp_path, field, value, words):
    d = copy(hf_dir, tmp_path / "d")
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=words) as e:
        load_model(d)
    assert str(d / "config.json") in str(e.value) and "disagree" in str(e.value)


def test_params_json_disagrees(model, tmp_path):
    root = write_release_layout(model, tmp_path / "rel")
    params = json.loads((root / "params.json").read_text())
    params["moe"]["num_experts"] = 4
    (root / "params.json").write_text(json.dumps(params))
    with pytest.raises(CheckpointError, match=r"params\.json.*moe\.num_experts=4"):
        load_model(root)


class _Payload:
    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["consolidated.00.pth", "consolidated.00.pt"])
def test_pickle_with_code_is_refused(model, tmp_path, name):
    marker = tmp_path / "PWNED"
    payload = _Payload()
    payload.marker = marker
    sd = {k: v.clone() for k, v in to_mistral_state_dict(model.state_dict(), model.args).items()}
    sd["evil"] = payload
    torch.save(sd, tmp_path / name)
    (tmp_path / "params.json").write_text(json.dumps(params_dict(model.args)))
    with pytest.raises(CheckpointError, match=rf"refusing to load .*{name}.*weights_only") as e:
        load_model(tmp_path)
    assert "system" in str(e.value)
    assert not marker.exists()


def test_a_failed_read_returns_nothing(hf_dir, monkeypatch):
    from moe_lab.checkpoints.loading import CheckpointReader

    real = CheckpointReader.read_layer

    def flaky(self, layer, *a, **k):
        if layer == 1:
            raise OSError(5, "Input/output error")
        return real(self, layer, *a, **k)

    monkeypatch.setattr(CheckpointReader, "read_layer", flaky)
    result = None
    with pytest.raises(CheckpointError, match="Input/output error"):
        result = load_model(hf_dir)
    assert result is None


# --------------------------------------------------------------------------------------------
# memory


PEAK_SCRIPT = textwrap.dedent("""
    import sys, torch, moe_lab
    from moe_lab import load_model
    torch.set_num_threads(1)
    def hwm():  # peak RSS of this process in KiB (ru_maxrss would include pytest's, via fork)
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    from moe_lab.checkpoints.layouts import meta_model  # warm-up: torch's one-off lazy imports are baseline
    meta_model(moe_lab.ModelArgs(dim=8, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=8, vocab_size=8, n_experts=2))
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    base = hwm()
    m = load_model(sys.argv[1])
    print((hwm() - base) * 1024)
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status and madvise: Linux")
@pytest.mark.parametrize("layout", ["hf", "release"])
def test_peak_memory_while_loading(tmp_path, layout):
    """Peak RSS grows by < 1.25 x the checkpoint's size (not 2x: mapped pages are released)."""
    from moe_lab.model import ModelArgs

    args = ModelArgs(dim=256, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=512, vocab_size=1024, n_experts=8,
                     max_seq_len=64)
    m = make_model(args)
    path = save_model(m, tmp_path / "c") if layout == "hf" else write_release_layout(m, tmp_path / "c")
    size = sum(v.numel() * 4 for v in m.state_dict().values())
    del m
    out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], capture_output=True, text=True, check=True)
    grew = int(out.stdout.split()[-1])
    assert grew < 1.25 * size, f"peak RSS grew by {grew / 1e6:.1f} MB for a {size / 1e6:.1f} MB checkpoint"


def test_hf_pytorch_model_bin(model, tokens, tmp_path):
    """Older HF repos: pytorch_model.bin (a torch zip pickle) + config.json."""
    torch.save({k: v.clone() for k, v in to_hf_state_dict(model.state_dict(), model.args).items()},
               tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(model.args)))
    assert describe_checkpoint(tmp_path).kind == "hf"
    assert_same(load_model(tmp_path), model, tokens)
