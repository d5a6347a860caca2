"""StreamingMixtral: a layer-at-a-time forward gives exactly the in-memory model's outputs."""

from __future__ import annotations

import json
import weakref

import pytest
import torch

from conftest import CONFIG_IDS, TINY_CONFIGS, make_model, random_tokens
from moe_lab import StreamingMixtral, load_model, save_model
from moe_lab.checkpoints import streaming
from moe_lab.checkpoints.layouts import params_dict, to_mistral_state_dict


def left_padded(args, B=3, T=10, seed=0):
    tokens = random_tokens(args, B, T, seed)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :7] = 0
    return tokens, mask


def release_layout(model, root):
    root.mkdir()
    sd = to_mistral_state_dict(model.state_dict(), model.args, stacked=True)
    n = model.args.n_layers
    for L in range(n):
        part = {k: v.clone() for k, v in sd.items() if k.startswith(f"layers.{L}.")}
        if L == 0:
            part.update({k: v.clone() for k, v in sd.items() if not k.startswith("layers.")})
        torch.save(part, root / f"consolidated.{L:02d}.pt")
    (root / "params.json").write_text(json.dumps(params_dict(model.args)))
    return root


@pytest.mark.parametrize("args", TINY_CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("layout", ["hf", "hf-sharded", "mistral", "release"])
def test_streaming_equals_in_memory(args, layout, tmp_path):
    m = make_model(args, seed=7)
    if layout == "release":
        path = release_layout(m, tmp_path / "c")
    else:
        path = save_model(m, tmp_path / "c", layout="mistral" if layout == "mistral" else "hf",
                          max_shard_size="30KB" if layout == "hf-sharded" else None)
    tokens, mask = left_padded(args)
    with torch.no_grad():
        ref = m(tokens, attention_mask=mask)
        ref_plain = m(tokens)
    with StreamingMixtral(path) as sm:
        assert torch.equal(sm(tokens, attention_mask=mask), ref)
        assert torch.equal(sm(tokens), ref_plain)
        assert sm.loaded_blocks() == []  # every block freed again


def test_one_block_in_memory_at_a_time_and_callback(tmp_path):
    args = TINY_CONFIGS[3]  # 3 layers
    m = make_model(args)
    path = save_model(m, tmp_path / "c")
    tokens, mask = left_padded(args)
    ref_hidden = {}
    handles = [b.hook_resid_post.register_forward_hook(lambda mod, i, o, L=L: ref_hidden.__setitem__(L, o.clone()))
               for L, b in enumerate(m.blocks)]
    with torch.no_grad():
        ref_logits, ref_loss = m(tokens, tokens, attention_mask=mask)
    for h in handles:
        h.remove()
    sm = StreamingMixtral(path)
    seen = []

    def callback(i, block, hidden, router_logits):
        assert sm.loaded_blocks() == [i] and block is sm.model.blocks[i]
        assert torch.equal(hidden, ref_hidden[i])
        assert router_logits.shape == (tokens.numel(), args.n_experts)
        seen.append(i)

    logits, loss = sm(tokens, tokens, attention_mask=mask, layer_callback=callback)
    assert seen == [0, 1, 2]
    assert torch.equal(logits, ref_logits) and torch.equal(loss.total, ref_loss.total)
    # a callback that fails still leaves every block freed
    with pytest.raises(RuntimeError, match="boom"):
        sm(tokens, layer_callback=lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    assert sm.loaded_blocks() == []
    assert all(p.device.type == "meta" for b in sm.model.blocks for p in b.parameters())


def test_hooks_fire_with_the_usual_names(tmp_path):
    args = TINY_CONFIGS[1]
    m = make_model(args)
    path = save_model(m, tmp_path / "c")
    tokens = random_tokens(args, 2, 9)
    names = ["blocks.0.moe.hook_router_logits", "blocks.1.moe.hook_topk_indices", "blocks.1.hook_resid_mid",
             "blocks.0.moe.experts.3.hook_out", "hook_embed"]

    def capture(model):
        got, handles = {}, []
        mods = dict(model.named_modules())
        for n in names:
            handles.append(mods[n].register_forward_hook(lambda mod, i, o, n=n: got.__setitem__(n, o.clone())))
        return got, handles

    ref, h1 = capture(m)
    with torch.no_grad():
        m(tokens)
    sm = StreamingMixtral(path)
    got, h2 = capture(sm.model)
    sm(tokens)
    for h in h1 + h2:
        h.remove()
    assert set(got) == set(ref) == set(names)
    for n in names:
        assert torch.equal(got[n], ref[n]), n


def test_iter_layers_manual_loop(tmp_path):
    args = TINY_CONFIGS[2]
    m = make_model(args)
    path = save_model(m, tmp_path / "c", layout="mistral")
    tokens, mask = left_padded(args)
    with torch.no_grad():
        ref = m(tokens, attention_mask=mask)
    sm = StreamingMixtral(path)
    x, ctx = sm.prepare(tokens, mask)
    with torch.no_grad():
        for i, block in sm.iter_layers():
            assert sm.loaded_blocks() == [i]
            x, _ = block(x, ctx)
    assert sm.loaded_blocks() == []
    assert torch.equal(sm.finish(x), ref)


def test_streaming_layers_subset_and_dtype(tmp_path):
    args = TINY_CONFIGS[3]
    m = make_model(args)
    path = save_model(m, tmp_path / "c")
    tokens = random_tokens(args, 2, 8)
    for layers in (2, [2, 0]):
        ref = load_model(path, layers=layers, dtype=torch.bfloat16)
        sm = StreamingMixtral(path, layers=layers, dtype="bf16")
        assert sm.layer_ids == ref.layer_ids and sm.model.args.n_layers == ref.args.n_layers
        with torch.no_grad():
            assert torch.equal(sm(tokens), ref(tokens))
    with pytest.raises(ValueError, match="out of range"):
        StreamingMixtral(path, layers=[5])


def test_trace_routing_on_a_streaming_model(tmp_path):
    """The tracing code takes ``sm.model`` like any Mixtral; routing identical to in-memory."""
    trace_routing = pytest.importorskip("moe_lab.routing.tracing").trace_routing
    args = TINY_CONFIGS[1]
    m = make_model(args)
    path = save_model(m, tmp_path / "c")
    docs = [random_tokens(args, 1, n, seed=n)[0].tolist() for n in (5, 9, 7)]
    ref = trace_routing(m, docs, progress=False, add_bos=False)
    sm = StreamingMixtral(path)
    got = trace_routing(sm.model, docs, progress=False, add_bos=False)
    sm.free_all()
    assert (got.expert_ids == ref.expert_ids).all()
    assert abs(got.weights - ref.weights).max() == 0


# ---- one layer buffer, reused only when nothing else holds it


def _three_layer_checkpoint(tmp_path):
    args = TINY_CONFIGS[3]  # 3 layers, all the same size
    m = make_model(args, seed=3)
    return m, save_model(m, tmp_path / "c"), random_tokens(args, 2, 9)


def test_layer_buffer_is_reused_when_nothing_holds_it(tmp_path):
    m, path, tokens = _three_layer_checkpoint(tmp_path)
    with torch.no_grad():
        ref = m(tokens)
    sm = StreamingMixtral(path)
    x, ctx = sm.prepare(tokens)
    ptrs, first = [], None
    with torch.no_grad():
        for i, block in sm.iter_layers():
            ptrs.append(block.attn.wq.weight.data_ptr())
            if i == 0:
                first = weakref.ref(sm.buffer)  # a weak handle does not count as holding
            assert sm.buffer is first()  # the same storage object: layers 1, 2 reuse layer 0's
            x, _ = block(x, ctx)
    assert len(set(ptrs)) == 1
    assert torch.equal(sm.finish(x), ref)
    assert torch.equal(sm(tokens), ref) and sm.buffer is first()  # kept across forwards too
    sm.release_buffer()
    assert sm.buffer is None and first() is None  # given back
    assert torch.equal(sm(tokens), ref)
    # the reference behaviour without reuse gives the same logits
    assert torch.equal(StreamingMixtral(path, reuse_buffer=False)(tokens), ref)


@pytest.mark.parametrize("zero_copy", [True, False], ids=["zero-copy", "copies"])
@pytest.mark.parametrize("how", ["callback", "hook", "view"])
def test_a_held_weight_is_never_overwritten(how, zero_copy, tmp_path):
    m, path, tokens = _three_layer_checkpoint(tmp_path)
    with torch.no_grad():
        ref = m(tokens)
    sm = StreamingMixtral(path, zero_copy=zero_copy)
    # the weight held: one in the reused buffer (with zero-copy, wq: its rows are permuted, so copied)
    linear = (lambda b: b.attn.wq) if zero_copy else (lambda b: b.moe.gate)
    held, ptrs = {}, []
    sm.model.blocks[1].register_forward_pre_hook(lambda b, i: ptrs.append(b.attn.wq.weight.data_ptr()))
    sm.model.blocks[0].register_forward_pre_hook(lambda b, i: ptrs.append(b.attn.wq.weight.data_ptr()))
    if how == "callback":  # a layer_callback that stores a weight of layer 0
        cb = lambda i, block, h, r: held.setdefault("w", linear(block).weight) if i == 0 else None
        logits = sm(tokens, layer_callback=cb)
    elif how == "hook":  # a user's hook that keeps the weight (the Parameter itself)
        def keep(mod, inputs, output):
            held["w"] = mod.weight

        linear(sm.model.blocks[0]).register_forward_hook(keep)
        logits = sm(tokens)
    else:  # a view into layer 0's memory (not the Parameter itself), taken in a manual loop
        x, ctx = sm.prepare(tokens)
        with torch.no_grad():
            for i, block in sm.iter_layers():
                if i == 0:
                    held["w"] = linear(block).weight[1:]
                x, _ = block(x, ctx)
        logits = sm.finish(x)
    assert torch.equal(logits, ref)
    want = linear(m.blocks[0]).weight
    w = held["w"]
    assert torch.equal(w, want[1:] if how == "view" else want)  # still layer 0's values
    assert not torch.equal(want, linear(m.blocks[1]).weight)  # (so overwriting would have shown)
    assert len(ptrs) == 2 and ptrs[0] != ptrs[1]  # layer 1 went to a fresh buffer


def test_a_held_zero_copy_weight_stays_correct(tmp_path):
    """A zero-copy weight kept after its block is freed is read again from the file."""
    m, path, tokens = _three_layer_checkpoint(tmp_path)
    sm = StreamingMixtral(path)
    held = {}
    sm(tokens, layer_callback=lambda i, block, h, r: held.setdefault(i, block.moe.experts[2].w2.weight))
    sm(tokens)  # every layer loaded and freed again (their pages dropped)
    for i in range(3):
        assert torch.equal(held[i], m.blocks[i].moe.experts[2].w2.weight)


def test_no_reuse_without_the_use_count(tmp_path, monkeypatch):
    """If torch lacks ``_storage_Use_Count``, ``storage_unshared`` says False: always a fresh buffer."""
    m, path, tokens = _three_layer_checkpoint(tmp_path)
    assert streaming.storage_unshared(torch.UntypedStorage(8))
    t = torch.empty(2)
    assert not streaming.storage_unshared(t.untyped_storage())  # the tensor and this handle
    assert not streaming.storage_unshared(t[1:].untyped_storage())  # a view counts too
    monkeypatch.setattr(streaming, "_use_count", None)
    assert not streaming.storage_unshared(torch.UntypedStorage(8))
    sm = StreamingMixtral(path)
    with torch.no_grad():
        assert torch.equal(sm(tokens), m(tokens))
    first = weakref.ref(sm.buffer)
    sm(tokens)
    assert first() is None  # replaced, not reused


# ---- zero-copy: weights used as views of the memory-mapped file


@pytest.mark.parametrize("layout", ["hf", "mistral", "release"])
@pytest.mark.parametrize("dtype,ask", [(torch.float32, None), (torch.bfloat16, None),
                                       (torch.float32, torch.bfloat16)], ids=["fp32", "bf16", "fp32-as-bf16"])
def test_zero_copy_gives_the_same_logits(layout, dtype, ask, tmp_path):
    args = TINY_CONFIGS[2]
    m = make_model(args, seed=11).to(dtype)
    if layout == "release":
        path = release_layout(m, tmp_path / "c")
    else:
        path = save_model(m, tmp_path / "c", layout=layout)
    tokens, mask = left_padded(args)
    with torch.no_grad():
        ref = m.to(ask or dtype)(tokens, attention_mask=mask)
    zc, copy = StreamingMixtral(path, dtype=ask), StreamingMixtral(path, dtype=ask, zero_copy=False)
    sd, views = zc.reader.read_layer_views(0, 0, ask)
    if ask is not None and ask != dtype:  # a cast: everything is copied
        assert views == []
    else:
        assert any(".moe.experts.0.w1." in k for k in views) and any(".moe.gate." in k for k in views)
        assert (layout == "hf") == ("blocks.0.attn.wq.weight" not in views)  # HF q rows are permuted: a copy
    out = zc(tokens, attention_mask=mask)
    assert torch.equal(out, copy(tokens, attention_mask=mask))
    assert torch.equal(out, ref)
    assert torch.equal(zc(tokens, attention_mask=mask), ref)  # again, after the pages were released
    assert zc.loaded_blocks() == []


def test_zero_copy_weights_are_the_mapped_file_and_freed_after_each_layer(tmp_path, monkeypatch):
    m, path, tokens = _three_layer_checkpoint(tmp_path)
    released = []
    monkeypatch.setattr(streaming, "release_pages", lambda t, touching=False: released.append((t.data_ptr(), touching)))
    sm = StreamingMixtral(path)
    x, ctx = sm.prepare(tokens)
    seen = []
    with torch.no_grad():
        for i, block in sm.iter_layers():
            w1 = block.moe.experts[0].w1.weight
            mapped = sm.reader.store.get(f"model.layers.{i}.block_sparse_moe.experts.0.w1.weight")
            assert w1.data_ptr() == mapped.data_ptr()  # no copy: the parameter is the file's bytes
            assert w1.untyped_storage().data_ptr() != sm.buffer.data_ptr()  # not in the copy buffer
            assert block.attn.wq.weight.untyped_storage().data_ptr() == sm.buffer.data_ptr()  # q: copied
            assert sm.loaded_blocks() == [i]
            assert not any(p == w1.data_ptr() for p, _ in released)  # not released while in use
            seen.append(w1.data_ptr())
            x, _ = block(x, ctx)
            del w1, mapped
        assert torch.equal(sm.finish(x), m(tokens))
    assert sm.loaded_blocks() == []
    assert all((p, True) in released for p in seen)  # each layer's mapped pages dropped when it was freed


def test_an_in_place_edit_never_reaches_the_file(tmp_path):
    m, path, tokens = _three_layer_checkpoint(tmp_path)
    files = sorted(path.glob("*.safetensors"))
    before = [f.read_bytes() for f in files]
    with torch.no_grad():
        ref = m(tokens)
    sm = StreamingMixtral(path)

    def edit(block, inputs):
        assert block.moe.gate.weight.data_ptr() == sm.reader.store.get(
            "model.layers.1.block_sparse_moe.gate.weight").data_ptr()  # a zero-copy view
        block.moe.gate.weight.add_(1.0)
        block.moe.experts[0].w2.weight.mul_(-3.0)

    h = sm.model.blocks[1].register_forward_pre_hook(edit)
    edited = sm(tokens)
    h.remove()
    assert not torch.equal(edited, ref)  # the edit did act on this forward
    with torch.no_grad():  # as it would on the in-memory model
        m.blocks[1].moe.gate.weight.add_(1.0)
        m.blocks[1].moe.experts[0].w2.weight.mul_(-3.0)
        assert torch.equal(edited, m(tokens))
    assert [f.read_bytes() for f in files] == before  # the file on disk is untouched
    assert torch.equal(sm(tokens), ref)  # and the edit was undone when the block was freed
    assert torch.equal(StreamingMixtral(path)(tokens), ref)  # a fresh reader sees the file as it was


def test_saved_files_are_aligned_for_zero_copy(tmp_path):
    from safetensors import safe_open

    from moe_lab.checkpoints.files import ALIGN, save_aligned_safetensors

    ts = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(4).to(torch.bfloat16),
          "empty": torch.zeros(0)}
    save_aligned_safetensors(ts, tmp_path / "x.safetensors", metadata={"format": "pt"})
    raw = (tmp_path / "x.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert (8 + n) % ALIGN == 0  # the data section starts on a 64-byte boundary
    with safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(ts)
        for k, v in ts.items():
            assert torch.equal(f.get_tensor(k), v) and f.get_tensor(k).dtype == v.dtype
        assert f.get_tensor("a").data_ptr() % ALIGN == 0


def test_pt_files_are_mapped_privately_even_if_the_default_is_shared(tmp_path):
    import mmap

    m = make_model(TINY_CONFIGS[3], seed=3)
    path = release_layout(m, tmp_path / "c")
    files = sorted(path.glob("*.pt"))
    before = [f.read_bytes() for f in files]
    tokens = random_tokens(m.args, 2, 9)
    with torch.serialization.set_default_mmap_options(mmap.MAP_SHARED):
        sm = StreamingMixtral(path)
    def edit(block, inputs):
        assert block.moe.gate.weight.data_ptr() % 64 == 0 and "blocks.0.moe.gate.weight" in views  # zero-copy
        block.moe.gate.weight.add_(1.0)

    views = sm.reader.read_layer_views(0, 0)[1]
    sm.model.blocks[0].register_forward_pre_hook(edit)
    with torch.no_grad():
        sm(tokens)
    assert [f.read_bytes() for f in files] == before
