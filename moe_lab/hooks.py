"""Named hook points, TransformerLens style: attach, cache, remove.

Every activation that matters has a name (``blocks.3.moe.hook_router_logits``, see
``docs/DESIGN.md``). A hook point is an identity module (:class:`HookPoint`, defined here) that
costs nothing until a hook is attached. This module attaches plain PyTorch forward hooks to
them and keeps track of the ones *it* added, so that cleaning up never touches a user's own
hooks::

    logits, cache = model.run_with_cache(tokens, names_filter="router_logits")
    cache["router_logits", 3]                   # same tensor as
    cache["blocks.3.moe.hook_router_logits"]

    def zero_expert_out(x, hook):               # return a tensor to replace the activation
        return torch.zeros_like(x)

    with model.hooks(fwd_hooks=[("blocks.0.moe.experts.5.hook_out", zero_expert_out)]):
        logits = model(tokens)                  # hooks are gone afterwards, also after an error

    handle = model.add_hook("hook_topk_indices", lambda x, hook: print(hook.name, x.shape))
    handle.remove()                             # or model.reset_hooks() (moe_lab's hooks only)

A hook function receives ``(activation, hook)`` where ``hook`` is the :class:`HookPoint`
(``hook.name`` is its full name) and may return a replacement tensor (or ``None`` to leave the
activation as it is).

Names filters (``names_filter`` and the name in ``fwd_hooks``) can be

* a full name: ``"blocks.3.moe.hook_router_logits"``;
* a kind, meaning that hook point in every layer: ``"router_logits"`` or
  ``"hook_router_logits"`` (``"expert_out"`` for ``moe.experts.{e}.hook_out``);
* a name suffix: ``"moe.hook_router_logits"``, ``"experts.5.hook_out"``;
* a list of any of these, or a callable ``name -> bool``.

A string that matches no hook point is an error (a typo should not silently cache nothing).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils.hooks import RemovableHandle

HookFn = Callable[[Tensor, "HookPoint"], "Tensor | None"]

_HANDLES_ATTR = "_moe_lab_hook_handles"
_LAYER_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_EXPERT_RE = re.compile(r"\.experts\.(\d+)\.")


class StopForward(Exception):
    """Raised by a hook to end a forward early (nothing after that module is computed): routing
    traces stop after the last traced layer, attribution after the layer it explains. The caller
    that registered the hook catches it."""


# --------------------------------------------------------------------------------------------
# the hook point


class HookPoint(nn.Module):
    """Identity module that names an activation. Free when nothing is attached."""

    name: str = ""

    def forward(self, x):
        return x

    def __call__(self, x):
        # Skip nn.Module's call machinery unless someone is listening.
        if not (self._forward_hooks or self._forward_pre_hooks):
            return x
        return super().__call__(x)

    @property
    def active(self) -> bool:
        return bool(self._forward_hooks or self._forward_pre_hooks)


def name_hook_points(model: nn.Module) -> None:
    """Give every hook point of ``model`` its full module name (``blocks.3.moe.hook_router_logits``)."""
    for name, mod in model.named_modules():
        if isinstance(mod, HookPoint):
            mod.name = name


# --------------------------------------------------------------------------------------------
# names


def hook_dict(model) -> dict[str, HookPoint]:
    """All hook points of ``model``, by full name, in module order."""
    out = {name: mod for name, mod in model.named_modules() if isinstance(mod, HookPoint)}
    if not out:
        raise TypeError(f"{type(model).__name__} has no moe_lab hook points (HookPoint modules); "
                        "named hooks work on moe_lab models. For a transformers model use "
                        "moe_lab.trace_routing, which reads its routers directly.")
    return out


def parse_name(name: str) -> tuple[str, int | None, int | None]:
    """``"blocks.3.moe.experts.5.hook_out"`` -> ``("expert_out", 3, 5)``;
    ``"blocks.3.moe.hook_router_logits"`` -> ``("router_logits", 3, None)``;
    ``"hook_embed"`` -> ``("embed", None, None)``."""
    last = name.rsplit(".", 1)[-1]
    kind = last[len("hook_"):] if last.startswith("hook_") else last
    m_layer, m_expert = _LAYER_RE.search(name), _EXPERT_RE.search(name)
    expert = int(m_expert.group(1)) if m_expert else None
    if expert is not None and kind == "out":
        kind = "expert_out"
    return kind, (int(m_layer.group(1)) if m_layer else None), expert


def _normalise_kind(kind: str) -> str:
    kind = kind[len("hook_"):] if kind.startswith("hook_") else kind
    return "expert_out" if kind == "out" else kind


def _string_matcher(s: str) -> Callable[[str], bool]:
    kind = _normalise_kind(s)

    def match(name: str) -> bool:
        return name == s or name.endswith("." + s) or parse_name(name)[0] == kind
    return match


def name_matcher(names_filter, available: Iterable[str] | None = None) -> Callable[[str], bool]:
    """A predicate ``name -> bool`` from a names filter (see the module docstring).

    With ``available`` (the model's hook names), every string in the filter must match at least
    one of them, otherwise a KeyError names the string and shows similar names.
    """
    if names_filter is None:
        return lambda name: True
    if callable(names_filter):
        return names_filter
    strings = [names_filter] if isinstance(names_filter, str) else list(names_filter)
    if not all(isinstance(s, str) for s in strings):
        raise TypeError(f"names_filter must be a string, a list of strings or a callable, got {names_filter!r}")
    matchers = [_string_matcher(s) for s in strings]
    if available is not None:
        available = list(available)
        for s, m in zip(strings, matchers):
            if not any(m(n) for n in available):
                kinds = sorted({parse_name(n)[0] for n in available})
                raise KeyError(f"no hook point matches {s!r}; hook kinds are {kinds}, full names look like "
                               f"{available[min(3, len(available) - 1)]!r} (see model.hook_points())")
    return lambda name: any(m(name) for m in matchers)


def resolve(model, names_filter) -> list[HookPoint]:
    """The hook points selected by ``names_filter`` (in module order)."""
    points = hook_dict(model)
    match = name_matcher(names_filter, points)
    return [hp for name, hp in points.items() if match(name)]


# --------------------------------------------------------------------------------------------
# handles


class HookHandle:
    """What every registration returns: ``.remove()`` detaches all the PyTorch hooks it made
    (idempotent); also a context manager (``with model.add_hook(...):``)."""

    def __init__(self, handles: list[RemovableHandle], names: list[str], owner=None):
        self.handles, self.names, self._owner = handles, names, owner

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        if self._owner is not None:
            registry = getattr(self._owner, _HANDLES_ATTR, None)
            if registry is not None and self in registry:
                registry.remove(self)
            self._owner = None

    def __enter__(self) -> "HookHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self.handles)

    def __repr__(self) -> str:
        shown = ", ".join(self.names[:3]) + (f", ... ({len(self.names)} in all)" if len(self.names) > 3 else "")
        return f"HookHandle([{shown}])"


def _registry(model) -> list[HookHandle]:
    reg = model.__dict__.get(_HANDLES_ATTR)
    if reg is None:
        reg = []
        object.__setattr__(model, _HANDLES_ATTR, reg)  # plain attribute, not a submodule/buffer
    return reg


def _torch_hook(fn: HookFn):
    def hook(module, inputs, output):
        return fn(output, module)
    return hook


def add_hook(model, names_filter, fn: HookFn, *, prepend: bool = False) -> HookHandle:
    """Attach ``fn(activation, hook) -> replacement | None`` to every hook point selected by
    ``names_filter``. Returns one :class:`HookHandle` for all of them."""
    if not callable(fn):
        raise TypeError(f"hook function must be callable, got {fn!r}")
    points = resolve(model, names_filter)
    handles = [hp.register_forward_hook(_torch_hook(fn), prepend=prepend) for hp in points]
    handle = HookHandle(handles, [hp.name for hp in points], owner=model)
    _registry(model).append(handle)
    return handle


def reset_hooks(model) -> int:
    """Remove every hook that moe_lab attached to ``model`` (its own registrations only: hooks
    a user registered with ``register_forward_hook`` stay). Returns how many were removed."""
    reg = _registry(model)
    n = 0
    while reg:
        h = reg.pop()
        n += len(h.handles)
        h._owner = None
        h.remove()
    return n


@contextmanager
def hooks(model, fwd_hooks: Iterable[tuple[object, HookFn]] = ()) -> Iterator:
    """``with hooks(model, fwd_hooks=[(name_or_filter, fn), ...]):`` hooks live for the block and
    are removed on exit, also when the block raises. Yields the model."""
    added: list[HookHandle] = []
    try:
        for names_filter, fn in fwd_hooks:
            added.append(add_hook(model, names_filter, fn))
        yield model
    finally:
        for h in reversed(added):
            h.remove()


# --------------------------------------------------------------------------------------------
# the cache


class ActivationCache(Mapping):
    """Activations by full hook name; also indexed by ``(kind, layer)`` and
    ``("expert_out", layer, expert)``::

        cache["blocks.3.moe.hook_router_logits"] is cache["router_logits", 3]
        cache.stack("topk_indices")            # [L, N, k]
        cache.layers("router_logits")          # layers present

    A hook point called several times in one forward (``experts.{e}.hook_out`` in the
    reference dispatch) holds its outputs concatenated along dim 0, in call order. Rows of
    ``experts.{e}.hook_out`` are the tokens routed to expert e, in increasing token order
    (``(cache["topk_indices", L] == e).any(-1).nonzero()``), before the routing weight.
    """

    def __init__(self, store: dict[str, Tensor]):
        self._store = dict(store)
        self._index: dict[tuple, str] = {}
        for name in self._store:
            kind, layer, expert = parse_name(name)
            key = (kind, layer) if expert is None else (kind, layer, expert)
            self._index[key] = name

    def _name(self, key) -> str:
        if isinstance(key, str):
            if key in self._store:
                return key
            k = (_normalise_kind(key), None)
            if k in self._index:
                return self._index[k]
            raise KeyError(f"{key!r} is not in this cache; it holds {self._short_list()}")
        if isinstance(key, tuple) and key and isinstance(key[0], str):
            k = (_normalise_kind(key[0]),) + tuple(int(x) for x in key[1:])
            if k in self._index:
                return self._index[k]
            raise KeyError(f"{key!r} is not in this cache; it holds {self._short_list()}")
        raise KeyError(f"index a cache by full name or (kind, layer[, expert]), got {key!r}")

    def _short_list(self) -> str:
        names = list(self._store)
        return f"{len(names)} activations, e.g. {names[:4]}" if names else "nothing (check names_filter)"

    def __getitem__(self, key) -> Tensor:
        return self._store[self._name(key)]

    def __contains__(self, key) -> bool:
        try:
            self._name(key)
            return True
        except KeyError:
            return False

    def __iter__(self):
        return iter(self._store)

    def __len__(self) -> int:
        return len(self._store)

    def layers(self, kind: str) -> list[int]:
        """Layers for which ``kind`` was cached, in order."""
        kind = _normalise_kind(kind)
        return sorted({k[1] for k in self._index if k[0] == kind and k[1] is not None and len(k) == 2})

    def stack(self, kind: str, layers: Iterable[int] | None = None) -> Tensor:
        """``kind`` over layers stacked into one tensor ``[L, ...]``."""
        layers = self.layers(kind) if layers is None else list(layers)
        if not layers:
            raise KeyError(f"no {kind!r} activations in this cache; it holds {self._short_list()}")
        return torch.stack([self[kind, layer] for layer in layers])

    def to(self, device) -> "ActivationCache":
        return ActivationCache({k: v.to(device) for k, v in self._store.items()})

    def __repr__(self) -> str:
        return f"ActivationCache({self._short_list()})"


def run_with_cache(model, *args, names_filter=None, detach: bool = True, device=None, **kwargs):
    """Run ``model(*args, **kwargs)`` and record the selected activations.

    Returns ``(output, ActivationCache)``; ``output`` is whatever the forward returns (logits,
    or ``(logits, Loss)`` with targets). Tensors are detached unless ``detach=False`` and
    moved to ``device`` when given. ``attn.hook_pattern`` switches attention to the explicit
    (slower) path only when it is selected. Hooks are removed on exit, also on error.
    """
    store: dict[str, list[Tensor]] = {}

    def save(x, hook):
        t = x.detach() if detach else x
        if device is not None:
            t = t.to(device)
        store.setdefault(hook.name, []).append(t)

    handle = add_hook(model, names_filter, save)
    try:
        out = model(*args, **kwargs)
    finally:
        handle.remove()
    return out, ActivationCache({k: v[0] if len(v) == 1 else torch.cat(v) for k, v in store.items()})


# --------------------------------------------------------------------------------------------
# the methods a hooked model gets


class HookedMixin:
    """TransformerLens-style hook methods for an ``nn.Module`` that holds :class:`HookPoint` s."""

    @property
    def hook_dict(self) -> dict:
        """Every hook point by full name (``{"hook_embed": HookPoint, "blocks.0.hook_resid_pre": ...}``)."""
        return hook_dict(self)

    def hook_points(self) -> list[str]:
        """The full names of all hook points, in module order."""
        return list(hook_dict(self))

    def add_hook(self, names_filter, fn: HookFn, *, prepend: bool = False) -> HookHandle:
        """Attach ``fn(activation, hook) -> replacement | None`` to the selected hook points;
        returns a handle (``.remove()``, also a context manager)."""
        return add_hook(self, names_filter, fn, prepend=prepend)

    def hooks(self, fwd_hooks=()):
        """``with model.hooks(fwd_hooks=[(name, fn), ...]):`` hooks for one block of code,
        removed on exit (also on error)."""
        return hooks(self, fwd_hooks)

    def reset_hooks(self) -> int:
        """Remove the hooks moe_lab attached (a user's own PyTorch hooks stay)."""
        return reset_hooks(self)

    def run_with_cache(self, *args, names_filter=None, **kwargs):
        """``logits, cache = model.run_with_cache(tokens, names_filter=...)``."""
        return run_with_cache(self, *args, names_filter=names_filter, **kwargs)
