"""An ipywidgets explorer of routing: type a text (or pick a sample of a domain), pick the
layer and the model, and see the tokens coloured by expert, a table of every token's top-k
experts and the expert load; an intervention panel switches an expert off (three ways: the
router reroutes, its contribution is zeroed, or another expert computes its slot), steers the
router toward it, or forces it on at a layer, and shows how the next-token distribution and the
routing of later layers change.

::

    from moe_lab.widgets import explore
    explorer = explore(model, tokenizer)   # samples: default_samples(), real held-out text
    explorer = explore(model, tokenizer, samples={"python": [...], "english": [...]})

Everything the widget does goes through plain methods (:meth:`RoutingExplorer.set_text`,
:meth:`~RoutingExplorer.set_layer`, :meth:`~RoutingExplorer.set_model`,
:meth:`~RoutingExplorer.set_sample`, :meth:`~RoutingExplorer.apply_intervention`), which
update the explorer's figures (``token_fig``, ``load_fig``, ``table``, ``next_token_fig``,
``routing_change_fig``); the widget controls only call them. So the explorer can be driven
from code and tested without a browser.

Widgets need a live front-end (JupyterLab, Notebook, VS Code, Colab). Without one (plain
Python, ``jupyter nbconvert --execute``, nbval, papermill) :func:`explore` shows static
figures instead, whose layer switch works without a kernel; see :func:`widget_frontend` for
how that is decided and ``static=`` / ``MOE_LAB_WIDGETS`` to override it.

The explorer runs each model on its own device: load it on the GPU
(``moe_lab.load_demo_model(device="cuda")``) and every retrace and intervention runs there;
``device=`` only confirms it (:mod:`moe_lab.devices`).
"""

from __future__ import annotations

import html
import os
import sys
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from . import analysis as A
from . import viz
from .devices import resolve_device
from .evalset import EVAL_LANGS, LANGUAGE_NAMES, load_aligned_sample, load_heldout_sample
from .routing.interventions import AblateExpert, ForceExpert, SteerExperts, SwapExpert, intervene
from .routing.trace import RoutingTrace
from .routing.tracing import trace_routing

__all__ = ["RoutingExplorer", "InterventionEffect", "INTERVENTION_KINDS", "explore", "intervention_effect",
           "widget_frontend"]

WIDGETS_ENV = "MOE_LAB_WIDGETS"


# --------------------------------------------------------------------------------------------
# Front-end detection

def widget_frontend() -> str:
    """Where we are running: ``"widgets"`` (a kernel attached to a front-end that draws
    ipywidgets), ``"headless"`` (a kernel with no one watching: nbconvert/nbclient, nbval,
    papermill) or ``"none"`` (plain Python, IPython in a terminal).

    A kernel cannot ask its front-end what it draws, so this looks at what each front-end
    leaves behind: jupyter_server (JupyterLab, Notebook 7) sets ``JPY_SESSION_NAME`` in the
    kernel's environment, VS Code sets ``VSCODE_*`` variables and ``__vsc_ipynb_file__``,
    Colab imports ``google.colab``. A kernel without any of these is taken as headless. The
    environment variable ``MOE_LAB_WIDGETS=1`` (or ``0``) overrides the guess, e.g. for the
    old Notebook 6 server, which sets none of them.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return "none"
    ip = get_ipython()
    if ip is None:
        return "none"
    try:
        from ipykernel.zmqshell import ZMQInteractiveShell
    except ImportError:  # pragma: no cover
        return "none"
    if not isinstance(ip, ZMQInteractiveShell):
        return "none"
    forced = os.environ.get(WIDGETS_ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return "widgets"
    if forced in ("0", "false", "no", "off"):
        return "headless"
    env = os.environ
    if ("google.colab" in sys.modules or env.get("JPY_SESSION_NAME") or "__vsc_ipynb_file__" in ip.user_ns
            or any(k.startswith("VSCODE_") for k in env) or env.get("PYCHARM_HOSTED")):
        return "widgets"
    return "headless"


# --------------------------------------------------------------------------------------------
# Interventions

@dataclass
class InterventionEffect:
    """What an intervention changed on one text: next-token distributions and routing."""

    kind: str  # one of INTERVENTION_KINDS: "ablate", "zero", "swap", "steer", "force"
    layer: int
    expert: int
    base_probs: np.ndarray  # [V] next-token distribution with normal routing
    new_probs: np.ndarray  # [V] with the intervention
    base_trace: RoutingTrace
    new_trace: RoutingTrace
    replacement: int | None = None  # "swap": the expert that computes the slot
    offset: float | None = None  # "steer": added to the expert's router logit

    @property
    def description(self) -> str:
        """``"expert 3 switched off (rerouted) at layer 1"`` and so on."""
        what = {"ablate": "switched off (rerouted)", "zero": "switched off (contribution zeroed)",
                "swap": f"replaced by expert {self.replacement}", "steer": f"steered ({self.offset:+g} on its logit)"
                if self.offset is not None else "steered", "force": "forced on"}[self.kind]
        return f"expert {self.expert} {what} at layer {self.layer}"

    @property
    def kl(self) -> float:
        """KL(normal || intervened) of the next-token distributions, in nats."""
        p, q = self.base_probs.astype(np.float64), self.new_probs.astype(np.float64)
        return float(np.sum(np.where(p > 0, p * (np.log(np.clip(p, 1e-30, None)) - np.log(np.clip(q, 1e-30, None))), 0)))

    @property
    def top_token_changed(self) -> bool:
        return int(self.base_probs.argmax()) != int(self.new_probs.argmax())

    def changes(self):
        """DataFrame per layer: share of tokens whose first choice / top-k set changed."""
        import pandas as pd

        layers, first, sets = viz.routing_changes(self.base_trace, self.new_trace)
        return pd.DataFrame({"layer": layers, "first_choice_changed": first, "topk_set_changed": sets})

    def summary(self, tokenizer=None) -> str:
        top = lambda p: int(p.argmax())  # noqa: E731
        name = (lambda i: repr(tokenizer.pieces([i])[0])) if tokenizer is not None else str
        df = self.changes()
        later = df[df.layer > self.layer]
        d = self.description
        return (f"{d[0].upper()}{d[1:]}: next token {name(top(self.base_probs))} "
                f"({self.base_probs.max():.1%}) -> {name(top(self.new_probs))} ({self.new_probs.max():.1%}), "
                f"KL {self.kl:.3f} nats; top-k set changed for "
                f"{df[df.layer == self.layer].topk_set_changed.iloc[0]:.0%} of tokens at layer {self.layer}"
                + (f" and {later.topk_set_changed.mean():.0%} on average in later layers" if len(later) else "") + ".")


# what the intervention panel offers: kind -> label (the three ablations, steering, forcing)
INTERVENTION_KINDS = {
    "ablate": "switch off: reroute",  # AblateExpert(mode="reroute"): the next expert takes the slot
    "zero": "switch off: zero",  # AblateExpert(mode="zero"): routing kept, contribution removed
    "swap": "swap for another",  # SwapExpert: another expert computes the slot
    "steer": "steer (logit offset)",  # SteerExperts: offset added to the router logit
    "force": "force on",  # ForceExpert: in every token's top-k
}


def _intervention(kind: str, layer: int, expert: int, replacement: int | None = None, offset: float | None = None):
    if kind == "ablate":
        return AblateExpert(layer=layer, expert=expert)
    if kind == "zero":
        return AblateExpert(layer=layer, expert=expert, mode="zero")
    if kind == "swap":
        if replacement is None:
            raise ValueError("kind 'swap' needs replacement= (the expert that computes the slot)")
        return SwapExpert(layer=layer, expert=expert, replacement=int(replacement))
    if kind == "steer":
        if offset is None:
            raise ValueError("kind 'steer' needs offset= (added to the expert's router logit)")
        return SteerExperts(layer=layer, offsets={expert: float(offset)})
    if kind == "force":
        return ForceExpert(layer=layer, expert=expert)
    raise ValueError(f"kind must be one of {list(INTERVENTION_KINDS)}, got {kind!r}")


def _trace_ids(model, ids: list[int], tokenizer=None, domain: str = "", device=None) -> RoutingTrace:

    return trace_routing(model, [ids], tokenizer=tokenizer, keep_logits=True, progress=False,
                         domain=domain or None, device=device)


@torch.inference_mode()
def _next_probs(model, ids: list[int], device=None) -> np.ndarray:
    logits = model(torch.tensor([ids], device=resolve_device(model, device)))
    return torch.softmax(logits[0, -1].float(), -1).cpu().numpy()


def intervention_effect(model, ids: Sequence[int], kind: str, layer: int, expert: int, *,
                        replacement: int | None = None, offset: float | None = None,
                        tokenizer=None, base: tuple[np.ndarray, RoutingTrace] | None = None,
                        device=None) -> InterventionEffect:
    """Run ``ids`` with normal routing and with an intervention on expert ``expert`` at ``layer``
    (inside :func:`moe_lab.intervene`), and compare. ``kind``: ``"ablate"`` (switched off, the
    next expert takes the slot: :class:`moe_lab.AblateExpert`), ``"zero"`` (its contribution
    removed, routing kept: ``AblateExpert(mode="zero")``), ``"swap"`` (expert ``replacement``
    computes its slots: :class:`moe_lab.SwapExpert`), ``"steer"`` (``offset`` added to its router
    logit: :class:`moe_lab.SteerExperts`) or ``"force"`` (:class:`moe_lab.ForceExpert`). ``base``
    reuses an earlier normal run ``(probs, trace)``. Runs on the model's device (``device``: None
    or the model's device); the effect's arrays are on the CPU."""
    ids = [int(i) for i in ids]
    iv = _intervention(kind, layer, expert, replacement, offset)
    if base is None:
        base = (_next_probs(model, ids, device), _trace_ids(model, ids, tokenizer, device=device))
    with intervene(model, iv):
        new_probs = _next_probs(model, ids, device)
        new_trace = _trace_ids(model, ids, tokenizer, device=device)
    return InterventionEffect(kind=kind, layer=int(layer), expert=int(expert), base_probs=base[0],
                              new_probs=new_probs, base_trace=base[1], new_trace=new_trace,
                              replacement=None if kind != "swap" else int(replacement),
                              offset=None if kind != "steer" else float(offset))


# --------------------------------------------------------------------------------------------
# The explorer

def _mimebundle(fig) -> dict:
    """The display bundle of a figure under the current renderer (for an Output widget)."""
    bundle = fig._repr_mimebundle_() if _renderer_set() else {}
    if not bundle:
        bundle = {"application/vnd.plotly.v1+json": fig.to_plotly_json(),
                  "text/html": fig.to_html(include_plotlyjs="cdn", full_html=False)}
    bundle.setdefault("text/plain", f"<plotly figure: {fig.layout.title.text or ''}>")
    return bundle


def _renderer_set() -> bool:
    import plotly.io as pio

    return bool(pio.renderers.default)


def _table_html(df, n_experts: int, max_rows: int = 300) -> str:
    """A compact HTML table of the per-token routing, expert cells in the expert colours."""
    rows = []
    head = "".join(f"<th style='padding:2px 6px;text-align:left'>{html.escape(c)}</th>" for c in df.columns)
    for rec in df.head(max_rows).itertuples(index=False):
        cells = []
        for col, v in zip(df.columns, rec):
            style = "padding:1px 6px;"
            if col.startswith("expert"):
                bg = viz.expert_color(int(v))
                style += f"background:{bg};color:{viz.text_color(bg)};text-align:center;"
                text = str(int(v))
            elif isinstance(v, float):
                text = f"{v:.2f}"
            else:
                text = html.escape(str(v))
            cells.append(f"<td style='{style}'>{text}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = f"<div>... {len(df) - max_rows} more rows</div>" if len(df) > max_rows else ""
    return ("<div style='max-height:360px;overflow:auto;font-family:monospace;font-size:12px'>"
            f"<table style='border-collapse:collapse'><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}"
            f"</tbody></table>{more}</div>")


class RoutingExplorer:
    """Interactive view of one model's routing on one text (see the module docstring).

    Args:
        model: a moe_lab ``Mixtral`` (or ``None`` when ``models`` is given).
        tokenizer: the Mixtral tokenizer (``moe_lab.load_tokenizer()``).
        samples: ``{domain: [text, ...]}`` offered in the sample picker.
        models: ``{name: model}`` offered in the model picker (``model``, if given and not among
            them, is added as ``"model"``).
        text: the first text shown (default: the first sample, or a short sentence).
        layer: the first layer shown (default: the first).
        max_tokens: longer texts are cut to this many tokens.
        device: None (each model runs on its own device) or the device every model must be on
            (checked here, so a model on the wrong device fails now and says how to move it).
    """

    DEFAULT_TEXT = "def add(a, b):\n    return a + b\n\nThe cat sat on the mat. 3 + 4 = 7"

    def __init__(self, model=None, tokenizer=None, samples: Mapping[str, Sequence[str]] | None = None,
                 models: Mapping[str, object] | None = None, *, text: str | None = None, layer: int | None = None,
                 max_tokens: int = 256, top_n: int = 10, device=None):
        if tokenizer is None:
            raise ValueError("RoutingExplorer needs the tokenizer (moe_lab.load_tokenizer())")
        self.models: dict[str, object] = dict(models or {})
        if model is not None and not any(m is model for m in self.models.values()):
            self.models = {"model": model, **self.models}
        if not self.models:
            raise ValueError("RoutingExplorer needs a model (or models={name: model})")
        for m in self.models.values():
            resolve_device(m, device)
        self.device = device
        self.tokenizer = tokenizer
        self.samples = {d: list(v) for d, v in (samples or {}).items()}
        self.max_tokens, self.top_n = int(max_tokens), int(top_n)
        self.model_name = next(iter(self.models))
        self.domain, self.sample = "", None
        self.effect: InterventionEffect | None = None
        self._widget = None
        self._syncing = False
        if text is None:
            first = next(((d, v[0]) for d, v in self.samples.items() if v), None)
            text = first[1] if first else self.DEFAULT_TEXT
            self.domain = first[0] if first else ""
            self.sample = (first[0], 0) if first else None
        self.layer = 0
        self._retrace(text)
        self.layer = self.layers[0] if layer is None else self._check_layer(layer)
        self._refresh()

    # ------------------------------------------------------------------ state

    @property
    def model(self):
        return self.models[self.model_name]

    @property
    def layers(self) -> list[int]:
        return list(self.trace.layers)

    @property
    def n_experts(self) -> int:
        return self.trace.n_experts

    def _check_layer(self, layer: int) -> int:
        layer = int(layer)
        if layer not in self.layers:
            raise KeyError(f"layer {layer} is not a layer of model {self.model_name!r} (layers {self.layers})")
        return layer

    def _retrace(self, text: str, domain: str | None = None) -> None:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("text is empty")
        self.text = text
        self.ids = self.tokenizer.encode(text)[: self.max_tokens]
        self.trace = _trace_ids(self.model, self.ids, self.tokenizer, self.domain if domain is None else domain,
                                self.device)
        self.next_probs = _next_probs(self.model, self.ids, self.device)
        self.effect = None

    # ------------------------------------------------------------------ callbacks

    def set_text(self, text: str, domain: str = "") -> "RoutingExplorer":
        """Trace a new text (and forget the last intervention)."""
        self._retrace(text, domain)
        self.domain, self.sample = domain, None
        self._refresh()
        return self

    def set_sample(self, domain: str, index: int = 0) -> "RoutingExplorer":
        """Trace the ``index``-th sample of ``domain``."""
        if domain not in self.samples:
            raise KeyError(f"no samples for domain {domain!r}; domains: {list(self.samples)}")
        texts = self.samples[domain]
        if not -len(texts) <= index < len(texts):
            raise IndexError(f"domain {domain!r} has {len(texts)} samples, no sample {index}")
        self._retrace(texts[index], domain)
        self.domain, self.sample = domain, (domain, index % len(texts))
        self._refresh()
        return self

    def set_layer(self, layer: int) -> "RoutingExplorer":
        """Show another layer (no new forward pass)."""
        self.layer = self._check_layer(layer)
        self._refresh()
        return self

    def set_model(self, name: str) -> "RoutingExplorer":
        """Switch model and re-trace the current text (keeps the layer when the model has it)."""
        if name not in self.models:
            raise KeyError(f"unknown model {name!r}; models: {list(self.models)}")
        self.model_name = name
        self._retrace(self.text)
        if self.layer not in self.layers:
            self.layer = self.layers[0]
        self._refresh()
        return self

    def apply_intervention(self, kind: str, expert: int, layer: int | None = None, *,
                           replacement: int | None = None, offset: float | None = None) -> InterventionEffect:
        """Act on ``expert`` at ``layer`` (default: the layer shown) and compare with normal
        routing. ``kind``: ``"ablate"`` (switch off, reroute), ``"zero"`` (switch off, zero its
        contribution), ``"swap"`` (with ``replacement``), ``"steer"`` (with ``offset``) or
        ``"force"``; see :func:`intervention_effect`."""
        layer = self.layer if layer is None else self._check_layer(layer)
        if not 0 <= int(expert) < self.n_experts:
            raise ValueError(f"expert {expert} is outside [0, {self.n_experts})")
        self.effect = intervention_effect(self.model, self.ids, kind, layer, int(expert), replacement=replacement,
                                          offset=offset, tokenizer=self.tokenizer, base=(self.next_probs, self.trace),
                                          device=self.device)
        self._refresh(intervention_only=True)
        return self.effect

    def clear_intervention(self) -> None:
        self.effect = None
        self._refresh(intervention_only=True)

    # ------------------------------------------------------------------ figures

    def _refresh(self, intervention_only: bool = False) -> None:
        if not intervention_only:
            self.token_fig = viz.token_figure(self.trace, layers=[self.layer], max_tokens=None,
                                              title=f"{self.model_name}: first-choice expert")
            self.load_fig = viz.domain_load_bars(self.trace, layer=self.layer,
                                                 title=f"Expert load on this text, layer {self.layer}")
            self.load_fig.update_layout(height=320, width=520, showlegend=False, margin=dict(t=60, r=10))
        if self.effect is None:
            self.next_token_fig = viz.next_token_figure(self.next_probs, self.next_probs, self.tokenizer,
                                                        top_n=self.top_n, labels=("normal routing", "normal routing"),
                                                        title="Next-token probabilities (no intervention yet)")
            self.next_token_fig.data[1].visible = False
            self.routing_change_fig = None
        else:
            e = self.effect
            self.next_token_fig = viz.next_token_figure(
                e.base_probs, e.new_probs, self.tokenizer, top_n=self.top_n,
                labels=("normal routing", e.description))
            self.routing_change_fig = viz.routing_change_figure(e.base_trace, e.new_trace, marker_layer=e.layer)
        if self._widget is not None:
            self._render()

    @property
    def table(self):
        """DataFrame, one row per token: position, token, expert/weight of each rank at the
        shown layer, and the router entropy (nats)."""
        import pandas as pd


        row = self.trace.layer_index(self.layer)
        ids, w = self.trace.expert_ids[row], self.trace.weights
        data = {"position": self.trace.positions, "token": list(self.trace.pieces or self.tokenizer.pieces(self.ids))}
        for j in range(self.trace.top_k):
            data[f"expert {j + 1}"] = ids[:, j]
            if w is not None:  # an id-only trace has no weights
                data[f"weight {j + 1}"] = w[row][:, j].astype(float)
        if self.trace.router_logits is not None:
            data["entropy"] = A.router_confidence(self.trace).entropy[row].astype(float)
        return pd.DataFrame(data)

    def figures(self) -> dict:
        """The current figures by name (those that exist)."""
        figs = {"tokens": self.token_fig, "load": self.load_fig, "next_token": self.next_token_fig}
        if self.routing_change_fig is not None:
            figs["routing_change"] = self.routing_change_fig
        return figs

    # ------------------------------------------------------------------ widget

    @property
    def widget(self):
        """The ipywidgets view (built on first use)."""
        if self._widget is None:
            self._build()
            self._render()
        return self._widget

    def _build(self) -> None:
        import ipywidgets as W

        self.w_model = W.Dropdown(options=list(self.models), value=self.model_name, description="model",
                                  layout=W.Layout(width="220px"))
        sample_opts = [("(your text)", None)] + [
            (f"{d}: {t[:40]!r}", (d, i)) for d, texts in self.samples.items() for i, t in enumerate(texts)]
        self.w_sample = W.Dropdown(options=sample_opts, value=None, description="sample",
                                   layout=W.Layout(width="420px"))
        self.w_layer = W.Dropdown(options=self.layers, value=self.layer, description="layer",
                                  layout=W.Layout(width="160px"))
        self.w_text = W.Textarea(value=self.text, continuous_update=False, placeholder="Type a text and press Trace",
                                 layout=W.Layout(width="100%", height="90px"))
        self.w_trace = W.Button(description="Trace", button_style="primary", icon="play")
        self.w_status = W.HTML()
        self.out_tokens, self.out_load, self.out_next, self.out_change = (W.Output() for _ in range(4))
        self.w_table = W.HTML()
        self.w_kind = W.ToggleButtons(options=[(label, k) for k, label in INTERVENTION_KINDS.items()], value="ablate",
                                      description="action")
        self.w_expert = W.Dropdown(options=list(range(self.n_experts)), value=0, description="expert",
                                   layout=W.Layout(width="150px"))
        self.w_replacement = W.Dropdown(options=list(range(self.n_experts)), value=min(1, self.n_experts - 1),
                                        description="by expert", layout=W.Layout(width="170px"))  # for "swap"
        self.w_offset = W.FloatSlider(value=2.0, min=-10.0, max=10.0, step=0.5, description="offset",
                                      layout=W.Layout(width="300px"))  # for "steer"
        self.w_iv_layer = W.Dropdown(options=self.layers, value=self.layer, description="at layer",
                                     layout=W.Layout(width="160px"))
        self.w_apply = W.Button(description="Apply", button_style="warning", icon="flask")
        self.w_clear = W.Button(description="Reset", icon="undo")
        self.w_effect = W.HTML()

        self.w_model.observe(lambda ch: self._from_widget(self.set_model, ch["new"]), names="value")
        self.w_layer.observe(lambda ch: self._from_widget(self.set_layer, ch["new"]), names="value")
        self.w_sample.observe(lambda ch: ch["new"] is not None and self._from_widget(self.set_sample, *ch["new"]),
                              names="value")
        self.w_text.observe(lambda ch: self._from_widget(self.set_text, ch["new"]), names="value")
        self.w_trace.on_click(lambda _: self._from_widget(self.set_text, self.w_text.value))
        self.w_apply.on_click(lambda _: self._from_widget(
            self.apply_intervention, self.w_kind.value, self.w_expert.value, self.w_iv_layer.value,
            replacement=self.w_replacement.value if self.w_kind.value == "swap" else None,
            offset=self.w_offset.value if self.w_kind.value == "steer" else None))
        self.w_kind.observe(lambda ch: self._show_kind_options(), names="value")
        self.w_clear.on_click(lambda _: self._from_widget(self.clear_intervention))

        wrap = W.Layout(flex_flow="row wrap", align_items="flex-start")  # side by side when there is room
        controls = W.HBox([self.w_model, self.w_sample, self.w_layer], layout=wrap)
        routing = W.VBox([self.out_tokens, W.HBox([W.VBox([W.HTML("<b>Top-k experts per token</b>"), self.w_table],
                                                          layout=W.Layout(width="500px", margin="0 16px 0 0")),
                                                   self.out_load], layout=wrap)])
        panel = W.VBox([W.HTML("<b>Intervention</b> at one layer, then compare: switch an expert off "
                               "(<i>reroute</i>: router logit -inf, the next expert takes the slot; <i>zero</i>: "
                               "routing kept, its contribution removed), <i>swap</i> it for another expert, "
                               "<i>steer</i> the router toward it (an offset on its logit) or <i>force</i> it into "
                               "every token's top-k."),
                        self.w_kind,
                        W.HBox([self.w_expert, self.w_replacement, self.w_offset, self.w_iv_layer, self.w_apply,
                                self.w_clear], layout=wrap),
                        self.w_effect, W.HBox([self.out_next, self.out_change], layout=wrap)])
        self._widget = W.VBox([controls, W.HBox([self.w_text, self.w_trace]), self.w_status, routing,
                               W.HTML("<hr>"), panel])
        self._add_css_classes()

    # stable hooks for the page (a browser test, a learner's CSS): widget attribute -> CSS class
    CSS_CLASSES = {"_widget": "moe-explorer", "w_model": "moe-explorer-model", "w_sample": "moe-explorer-sample",
                   "w_layer": "moe-explorer-layer", "w_text": "moe-explorer-text", "w_trace": "moe-explorer-trace",
                   "w_status": "moe-explorer-status", "out_tokens": "moe-explorer-tokens",
                   "out_load": "moe-explorer-load", "w_table": "moe-explorer-table", "w_kind": "moe-explorer-kind",
                   "w_expert": "moe-explorer-expert", "w_replacement": "moe-explorer-replacement",
                   "w_offset": "moe-explorer-offset", "w_iv_layer": "moe-explorer-iv-layer",
                   "w_apply": "moe-explorer-apply", "w_clear": "moe-explorer-reset", "w_effect": "moe-explorer-effect",
                   "out_next": "moe-explorer-next-token", "out_change": "moe-explorer-routing-change"}

    def _add_css_classes(self) -> None:
        """Give each control and output a CSS class (``moe-explorer-text``, ...: see ``CSS_CLASSES``)."""
        for attr, css in self.CSS_CLASSES.items():
            getattr(self, attr).add_class(css)

    def _show_kind_options(self) -> None:
        """Show the replacement picker for "swap" and the offset slider for "steer" only."""
        self.w_replacement.layout.display = None if self.w_kind.value == "swap" else "none"
        self.w_offset.layout.display = None if self.w_kind.value == "steer" else "none"

    def _from_widget(self, method, *args, **kwargs):
        """Run a callback for a widget event; errors show in the status line, not as tracebacks."""
        if self._syncing:
            return None
        try:
            self.w_status.value = ""
            return method(*args, **kwargs)
        except Exception as e:  # shown to the learner, the widget keeps working
            self.w_status.value = f"<span style='color:#CC3311'>{html.escape(type(e).__name__)}: {html.escape(str(e))}</span>"
            return None

    def _render(self) -> None:
        """Push the current state into the widget (controls and outputs)."""
        self._syncing = True
        try:
            self.w_model.value = self.model_name
            # options only when they change: assigning options resets a dropdown's choice
            if list(self.w_layer.options) != self.layers:
                self.w_layer.options = self.layers
            self.w_layer.value = self.layer
            if list(self.w_iv_layer.options) != self.layers:
                self.w_iv_layer.options = self.layers
                self.w_iv_layer.value = self.layer
            if list(self.w_expert.options) != list(range(self.n_experts)):
                self.w_expert.options = list(range(self.n_experts))
                self.w_replacement.options = list(range(self.n_experts))
            self._show_kind_options()
            if self.w_text.value != self.text:
                self.w_text.value = self.text
            self.w_sample.value = self.sample
        finally:
            self._syncing = False
        self.out_tokens.outputs = ({"output_type": "display_data", "data": _mimebundle(self.token_fig), "metadata": {}},)
        self.out_load.outputs = ({"output_type": "display_data", "data": _mimebundle(self.load_fig), "metadata": {}},)
        self.w_table.value = _table_html(self.table, self.n_experts)
        self.out_next.outputs = ({"output_type": "display_data", "data": _mimebundle(self.next_token_fig), "metadata": {}},)
        if self.routing_change_fig is None:
            self.out_change.outputs = ()
            self.w_effect.value = "<i>Pick an expert and a layer, then Apply.</i>"
        else:
            self.out_change.outputs = ({"output_type": "display_data", "data": _mimebundle(self.routing_change_fig),
                                        "metadata": {}},)
            self.w_effect.value = html.escape(self.effect.summary(self.tokenizer))

    def _repr_mimebundle_(self, include=None, exclude=None):
        return self.widget._repr_mimebundle_(include=include, exclude=exclude)

    # ------------------------------------------------------------------ static view

    def show_static(self, all_layers: bool = True) -> None:
        """Display static figures (token colours with a layer switch inside the figure, the
        per-token table, the load heatmap, and the intervention figures if any): what a
        notebook shows without a widget front-end. In plain Python, prints the table."""
        frontend = widget_frontend()
        if frontend == "none":
            try:
                from IPython import get_ipython
                in_ipython = get_ipython() is not None
            except ImportError:
                in_ipython = False
            if not in_ipython:
                print(f"{self.model_name}, layer {self.layer}: {len(self.ids)} tokens")
                print(self.table.to_string(index=False, max_rows=40))
                if self.effect is not None:
                    print(self.effect.summary(self.tokenizer))
                print("(figures: explorer.figures(); fig.show() or fig.write_html(path))")
                return
        from IPython.display import HTML, display

        layers = self.layers if all_layers else [self.layer]
        display(viz.token_figure(self.trace, layers=layers, max_tokens=None,
                               title=f"{self.model_name}: first-choice expert"))
        display(HTML(f"<b>Top-k experts per token, layer {self.layer}</b>" + _table_html(self.table, self.n_experts, 60)))
        display(viz.load_heatmap(self.trace, title=f"Expert load on this text ({self.model_name})"))
        if self.effect is not None:
            display(HTML(html.escape(self.effect.summary(self.tokenizer))))
            display(self.next_token_fig)
            display(self.routing_change_fig)

    def __repr__(self):
        return (f"RoutingExplorer(model={self.model_name!r}, layer={self.layer}, tokens={len(self.ids)}, "
                f"samples={ {d: len(v) for d, v in self.samples.items()} })")


def default_samples(per_language: int = 2, max_chars: int = 200) -> dict[str, list[str]]:
    """Real text for the explorer's sample picker, none of it trained on: the same paragraphs of
    *The Debian Administrator's Handbook* and GNOME Help in English, French, German, Spanish and
    Italian (``data/eval/aligned_heldout.jsonl``: pages held out in every language, so the samples
    of two languages are translations of each other) and held-out Python source
    (``data/eval/heldout_sample.jsonl``). ``{"english": [...], "french": [...], ..., "python": [...]}``."""
    rows = [r for r in load_aligned_sample() if all(40 <= len(r[g]) <= max_chars for g in EVAL_LANGS)]
    by_source: dict[str, list[dict]] = {}
    for r in rows:
        by_source.setdefault(r.get("source", ""), []).append(r)
    picked = [r for group in zip(*by_source.values()) for r in group][:per_language] or rows[:per_language]
    out = {LANGUAGE_NAMES[g]: [r[g] for r in picked] for g in EVAL_LANGS}
    code = [r["text"] for r in load_heldout_sample() if r["domain"] == "python"][:per_language]
    out["python"] = ["\n".join(t.splitlines()[:12]) + "\n" for t in code]
    return out


def explore(model=None, tokenizer=None, samples: Mapping[str, Sequence[str]] | None = None,
            models: Mapping[str, object] | None = None, *, static: bool | None = None, **kwargs) -> RoutingExplorer:
    """Open the routing explorer: the interactive widget when a widget front-end is attached
    (see :func:`widget_frontend`), otherwise static figures (``static=True`` forces them,
    ``static=False`` forces the widget). Returns the :class:`RoutingExplorer`, whose methods
    drive it from code. Without ``samples``, the picker offers :func:`default_samples`. ``kwargs`` go to
    :class:`RoutingExplorer` (``text=``, ``layer=``, ``device=``, ...)."""
    ex = RoutingExplorer(model, tokenizer, default_samples() if samples is None else samples, models, **kwargs)
    frontend = widget_frontend()
    if static is None:
        static = frontend != "widgets"
    if static:
        if frontend == "headless":
            from IPython.display import Markdown, display

            display(Markdown("*No widget front-end here (the notebook was run by nbconvert/nbval), so the "
                             "explorer shows static figures; in JupyterLab, Notebook, VS Code or Colab this "
                             "cell opens the interactive explorer.*"))
        ex.show_static()
    else:
        from IPython.display import display

        display(ex.widget)
    return ex
