"""Run a Mixtral bigger than memory: a layer-by-layer forward over memory-mapped weights.

Real Mixtral 8x7B is ~94 GB in bf16. ``StreamingMixtral`` keeps only the embeddings, the final
norm and the output head resident (0.5 GB for 8x7B in bf16) and, for each transformer block,
reads its weights from the checkpoint (memory-mapped safetensors or ``.pt`` files, any layout
:func:`moe_lab.load_model` reads), pushes the *whole batch* through it, frees it and moves on.
Peak memory is about one layer (~2.8 GB for 8x7B in bf16) plus activations, whatever the
number of layers.

Zero-copy (``zero_copy=True``, the default). A weight that needs no conversion is not copied
at all: the parameter *is* the memory-mapped view of the file, so reading it costs nothing
until the matmul touches it, and the layer's copy and its compute no longer run one after the
other. It applies, tensor by tensor, when the device is the CPU, the file is memory-mapped
(safetensors, zip-format ``.pt``), the checkpoint's dtype is the one asked for, the tensor is
64-byte aligned in the file (as a copy would be, so the matmuls are bit for bit the same; files
written by :func:`moe_lab.save_model` are aligned, other safetensors files only if their header
length happens to make them so) and the layout conversion is a rename or a contiguous slice: in a Hugging Face checkpoint every weight but
``wq``/``wk`` (their rows are permuted for RoPE), in mistral layouts every weight. The rest
(q/k of HF layouts, any dtype cast, any other device) is copied as below. When the block is
freed, the mapped pages it touched are dropped (``madvise(MADV_DONTNEED)``), so the resident
memory stays about one layer. The files are mapped privately (copy-on-write): an in-place
edit of a streamed weight (``block.moe.gate.weight.add_(1)`` in a hook) changes this forward
only, never the file, and is undone when the block is freed, just as with copies. A weight you
keep after its block is freed stays correct (it is read again from the file), but edits to it
are undone. ``zero_copy=False`` copies every tensor, as before. Logits are identical either way.

Copies. Every layer is read into the *same* buffer (writing into pages already
touched is ~5x faster than into fresh ones the OS must map and zero), unless something still
holds a tensor of the previous layer, in which case a fresh buffer is allocated so that tensor
is never overwritten (see :func:`storage_unshared`). The buffer is kept through the output
head and between forwards (a second forward touches no new memory);
``sm.release_buffer()`` (or ``close()``) hands it back. It is meant for prefill and routing
capture over a batch of documents; it does not train, and generation would re-read every layer
for every new token.

API::

    sm = StreamingMixtral(path, dtype=torch.bfloat16)     # layers=, device=, args=, layout= as load_model
                                                         # zero_copy=False: copy every weight
    logits = sm(tokens, attention_mask=mask)             # [B, T] -> [B, T, V], same numbers as load_model's

    # 1. hooks: ``sm.model`` is a real moe_lab.model.Mixtral whose weights live on the meta
    #    device except while its block runs, so every hook point exists under its usual name
    #    (``blocks.{L}.moe.hook_router_logits`` ...) and hooks attached to it fire as usual:
    sm.model.blocks[3].moe.hook_topk_indices.register_forward_hook(lambda m, i, o: print(o.shape))

    # 2. a per-layer callback, called after each block with its output:
    sm(tokens, layer_callback=lambda i, block, hidden, router_logits: ...)
    #    i: index in sm.model (sm.layer_ids[i] is the checkpoint's layer), block: the Block with
    #    its weights loaded, hidden: (B, T, D) residual stream after the block,
    #    router_logits: (B*T, E).

    # 3. your own loop (the pieces of ``Mixtral.forward``: embed -> blocks -> head):
    x, ctx = sm.prepare(tokens, attention_mask)          # = sm.model.embed(...)
    for i, block in sm.iter_layers():                   # weights freed when the loop moves on
        x, router_logits = block(x, ctx)
    logits = sm.finish(x)                               # = sm.model.head(x)

    # 4. code written for an in-memory Mixtral can take ``sm.model`` directly: calling it streams
    #    too (e.g. ``moe_lab.trace_routing(sm.model, docs, tokenizer=tok)``); call
    #    ``sm.free_all()`` afterwards if that code stopped the forward with an exception.

``forward`` runs ``Mixtral.forward`` itself (a forward pre-hook loads each block, a forward hook
frees it), so results match the in-memory model exactly.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Callable, Iterator

import torch
import torch.nn as nn
from torch import Tensor

from ..devices import pick_device
from .layouts import meta_model
from .files import release_pages
from .loading import CheckpointReader, as_dtype
from ..model import Block, ForwardContext, ModelArgs

__all__ = ["StreamingMixtral", "LayerCallback", "storage_unshared"]

LayerCallback = Callable[[int, Block, Tensor, Tensor], None]


def _malloc_trim() -> None:
    """Ask glibc to give freed heap memory back to the OS (no-op elsewhere)."""
    global _trim
    if _trim is None:
        _trim = False
        if sys.platform.startswith("linux"):
            try:
                _trim = ctypes.CDLL(None).malloc_trim
                _trim.argtypes, _trim.restype = [ctypes.c_size_t], ctypes.c_int
            except (OSError, AttributeError):  # musl and friends
                _trim = False
    if _trim:
        _trim(0)


_trim = None

_use_count = getattr(torch._C, "_storage_Use_Count", None)  # private torch API: may vanish


def storage_unshared(storage: torch.UntypedStorage) -> bool:
    """True when the handle ``storage`` is the only thing holding its memory: no tensor, view or
    Parameter anywhere still points into it, so overwriting it cannot change anything in use.

    A storage's use count is the number of handles on it: each tensor (every view included) and
    each Python ``UntypedStorage`` object counts one. We compare it with the count of a storage
    just allocated, held by its handle alone. Objects kept alive only by a reference cycle
    still count until the garbage collector runs (a fresh buffer then, never a wrong result).
    If torch lacks the function, the answer is always False: never reuse.
    """
    if _use_count is None:
        return False
    fresh = torch.UntypedStorage(0)  # keep it alive while its count is read
    try:
        return _use_count(storage._cdata) == _use_count(fresh._cdata)
    except (AttributeError, RuntimeError, TypeError):
        return False


def _to_meta(module: nn.Module) -> None:
    """Replace a module's parameters by meta tensors (frees their memory)."""
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and p.device.type != "meta":
                mod._parameters[name] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)


class StreamingMixtral:
    """A Mixtral whose blocks are read from disk one at a time (see the module docstring)."""

    def __init__(self, path, *, dtype=None, device="cpu", layers=None, args: ModelArgs | None = None,
                 layout: str | None = None, reuse_buffer: bool = True, zero_copy: bool = True):
        self.reuse_buffer = reuse_buffer
        self.zero_copy = zero_copy
        self._views: dict[int, list[Tensor]] = {}  # block -> its weights that are views of the mapped files
        self._buffer: torch.UntypedStorage | None = None  # the last layer's memory, to reuse
        self.reader = CheckpointReader(path, args=args, layout=layout)
        try:
            self.layer_ids = self.reader.layer_ids(layers)
            self.dtype = as_dtype(dtype) or self.reader.default_dtype
            self.device = pick_device(device)
            self.args = self.reader.args.replace(n_layers=len(self.layer_ids))
            self.model = meta_model(self.args)
            self.model.layer_ids = self.layer_ids
            self.model.load_state_dict(self.reader.read_globals(self.dtype, self.device), strict=False, assign=True)
            self.model.eval()
        except BaseException:
            self.reader.close()
            raise
        self._callback: LayerCallback | None = None
        for i, block in enumerate(self.model.blocks):
            block.register_forward_pre_hook(self._before_block)
            block.register_forward_hook(self._after_block)

    # ---- one block at a time

    def load_block(self, i: int) -> Block:
        """Read block ``i`` (of ``self.model``; checkpoint layer ``layer_ids[i]``) into memory."""
        block = self.model.blocks[i]
        into = self._buffer if self._buffer is not None and storage_unshared(self._buffer) else None
        sd, views = self.reader.read_layer_views(self.layer_ids[i], i, self.dtype, self.device, one_buffer=True,
                                                 into=into, zero_copy=self.zero_copy)
        copied = [v for k, v in sd.items() if k not in views]
        if copied:  # keep the layer's memory for the next one (if it was still held, we drop our handle on it)
            self._buffer = copied[0].untyped_storage() if self.reuse_buffer else None
        prefix = f"blocks.{i}."
        block.load_state_dict({k[len(prefix):]: v for k, v in sd.items()}, strict=True, assign=True)
        self._views[i] = [sd[k] for k in views]
        return block

    def free_block(self, i: int) -> None:
        _to_meta(self.model.blocks[i])
        for t in self._views.pop(i, []):  # the mapped pages this block read (and any writes into them)
            release_pages(t, touching=True)
        _malloc_trim()

    def free_all(self) -> None:
        """Free every block still holding weights (after a forward stopped by an exception)."""
        for i in self.loaded_blocks():
            self.free_block(i)

    @property
    def buffer(self) -> torch.UntypedStorage | None:
        """The storage the last loaded layer's copied tensors went into, reused for the next (None
        before the first layer, after ``release_buffer()``, with ``reuse_buffer=False``, or when
        zero-copy left nothing to copy, as in an aligned mistral-layout checkpoint)."""
        return self._buffer

    def release_buffer(self) -> None:
        """Hand the reused layer buffer back to the OS (the next forward allocates a new one)."""
        self._buffer = None
        _malloc_trim()

    def loaded_blocks(self) -> list[int]:
        """Indices of the blocks whose weights are in memory now (at most one during a forward)."""
        return [i for i, b in enumerate(self.model.blocks) if b.attn.wq.weight.device.type != "meta"]

    def _before_block(self, block: Block, inputs):
        if block.attn.wq.weight.device.type == "meta":
            self.load_block(block.layer)

    def _after_block(self, block: Block, inputs, output):
        try:
            if self._callback is not None:
                hidden, router_logits = output
                self._callback(block.layer, block, hidden, router_logits)
        finally:
            self.free_block(block.layer)

    def iter_layers(self) -> Iterator[tuple[int, Block]]:
        """Yield ``(i, block)`` with the block's weights loaded; freed when the loop moves on."""
        for i in range(len(self.layer_ids)):
            block = self.load_block(i)
            try:
                yield i, block
            finally:
                self.free_block(i)

    # ---- forward

    @torch.no_grad()
    def forward(self, tokens: Tensor, targets: Tensor | None = None, *, attention_mask: Tensor | None = None,
                layer_callback: LayerCallback | None = None):
        """Same contract as ``Mixtral.forward`` (no cache): logits [B, T, V] (and a Loss with targets)."""
        self._callback = layer_callback
        try:
            return self.model(tokens.to(self.device), None if targets is None else targets.to(self.device),
                              attention_mask=None if attention_mask is None else attention_mask.to(self.device))
        finally:
            self._callback = None
            self.free_all()

    __call__ = forward

    @torch.no_grad()
    def prepare(self, tokens: Tensor, attention_mask: Tensor | None = None) -> tuple[Tensor, ForwardContext]:
        """``Mixtral.embed``: embeddings (B, T, D) and the ``ForwardContext`` every block takes."""
        tokens = tokens.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        return self.model.embed(tokens, attention_mask)

    @torch.no_grad()
    def finish(self, x: Tensor) -> Tensor:
        """``Mixtral.head``: final norm and output layer, residual stream (B, T, D) -> logits (B, T, V)."""
        return self.model.head(x)

    # ---- housekeeping

    def close(self):
        self.release_buffer()
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"StreamingMixtral({str(self.reader.path)!r}, layers={len(self.layer_ids)}, dtype={self.dtype}, "
                f"device={self.device})")
