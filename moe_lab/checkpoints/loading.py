"""Load and save Mixtral checkpoints in every published layout: ``load_model`` / ``save_model``.

Layouts ``load_model`` detects (a directory, or a file inside one):

* **Hugging Face**: ``config.json`` + ``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors``
  with ``model.safetensors.index.json`` (also ``pytorch_model*.bin``). Keys may be hub names or
  transformers v5 in-memory names (fused ``mlp.experts.gate_up_proj`` / ``down_proj``).
* **Mistral native**: ``params.json`` + ``consolidated.safetensors`` (or its shards + index) or
  ``consolidated.00.pth``.
* **Original Mistral release** (Dec 2023): ``params.json`` + ``consolidated.00.pt`` .. ``.07.pt``,
  merged like a dict update, experts stacked (``layers.{L}.block_sparse_moe.w1`` [E*I, H], ...).
* **A state-dict file** (``.safetensors``/``.pt``/``.pth``/``.bin``) in any of the key styles of
  :mod:`moe_lab.checkpoints.layouts` (including moe_lab's own), with ``config.json`` or ``params.json`` next
  to it, or ``args=`` given.

How a load goes:

1. find the files and the config; open every tensor file memory-mapped (nothing read yet);
2. validate *everything* from the headers: missing shards, duplicated / missing / unexpected
   keys, shapes against the config, dtypes; any problem raises :class:`CheckpointError`
   naming the file and the keys;
3. build the model on the meta device (no memory), read tensors layer by layer, converting
   names, RoPE row order (HF stores q/k rows permuted for "rotate_half") and dtype tensor by
   tensor, each copied once into memory the model owns; the mapped pages are released as it
   goes, so peak RSS stays near the checkpoint's size S (not 2 S);
4. ``load_state_dict(strict=True, assign=True)``: the tensors become the parameters.

A failed load never returns a model. ``save_model`` writes into a temporary directory next to
the target and renames it into place at the end.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ..devices import pick_device
from .files import (
    SAFETENSORS_SUFFIXES,
    natural_key,
    TORCH_SUFFIXES,
    ALIGN,
    CheckpointError,
    MissingFileError,
    TensorInfo,
    TensorStore,
    atomic_directory,
    fmt_keys,
    open_tensor_file,
    read_index,
    release_pages,
    write_safetensors,
)
from .convert import args_from_hf_config, hf_config_dict, to_hf_state_dict
from .layouts import (
    IGNORED_KEY,
    args_from_params,
    detect_style,
    expected_shapes,
    from_style,
    layer_of,
    meta_model,
    params_dict,
    rename_layer,
    to_mistral_state_dict,
)
from ..model import Mixtral, ModelArgs

__all__ = ["CheckpointError", "MissingFileError", "load_model", "save_model", "describe_checkpoint",
           "CheckpointReader", "CheckpointInfo"]

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "float64": torch.float64, "fp64": torch.float64}


def as_dtype(dtype) -> torch.dtype | None:
    """None, a torch floating-point dtype or its name ("bf16", "float32", ...) -> the dtype or None."""
    if dtype is None or isinstance(dtype, torch.dtype):
        if dtype is not None and not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point dtype, got {dtype}")
        return dtype
    name = str(dtype).removeprefix("torch.").lower()
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use a torch dtype or one of {sorted(_DTYPES)}")
    return _DTYPES[name]


_as_dtype = as_dtype  # the name before it was public (kept for code written against it)


# --------------------------------------------------------------------------------------------
# Finding the files


@dataclass
class _Located:
    kind: str  # "hf", "mistral" or "state-dict"
    root: Path
    files: list[Path]
    config_file: Path | None
    index_file: Path | None = None
    weight_map: dict[str, str] | None = None


_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d{5})-of-(?P<n>\d{5})\.(?P<ext>safetensors|bin)$")
_RELEASE = re.compile(r"^consolidated\.(?P<i>\d{2})\.(?P<ext>pt|pth)$")


def _shard_set(root: Path, stem: str, ext: str) -> list[Path]:
    """``{stem}-0000i-of-0000n.{ext}`` files present; all n must be there."""
    found = {}
    for p in root.iterdir():
        m = _SHARD.match(p.name)
        if m and m["stem"] == stem and m["ext"] == ext:
            found.setdefault(int(m["n"]), {})[int(m["i"])] = p
    if not found:
        return []
    if len(found) > 1:
        raise CheckpointError(f"{root} mixes shard sets of different sizes: "
                              + ", ".join(f"of-{n:05d}" for n in sorted(found)))
    (n, shards), = found.items()
    missing = [f"{stem}-{i:05d}-of-{n:05d}.{ext}" for i in range(1, n + 1) if i not in shards]
    if missing:
        raise MissingFileError(f"missing shard(s) in {root}: {', '.join(missing)} "
                               f"(found {len(shards)} of {n}, and no index file)")
    return [shards[i] for i in range(1, n + 1)]


def _release_set(root: Path) -> list[Path]:
    """``consolidated.00.pt`` .. ``.NN.pt`` (or .pth) present, without gaps."""
    found = {}
    for p in root.iterdir():
        m = _RELEASE.match(p.name)
        if m:
            if int(m["i"]) in found:
                raise CheckpointError(f"{root} holds both {found[int(m['i'])].name} and {p.name}")
            found[int(m["i"])] = p
    if not found:
        return []
    missing = [i for i in range(max(found) + 1) if i not in found]
    if missing:
        ext = next(iter(found.values())).suffix
        raise MissingFileError(f"missing shard(s) in {root}: "
                               + ", ".join(f"consolidated.{i:02d}{ext}" for i in missing)
                               + f" (found {', '.join(found[i].name for i in sorted(found))})")
    return [found[i] for i in sorted(found)]


def _from_index(root: Path, index: Path, kind: str, config: Path | None) -> _Located:
    wm = read_index(index)
    files = sorted(set(wm.values()))
    missing = [fn for fn in files if not (root / fn).is_file()]
    if missing:
        held = {fn: [k for k, v in wm.items() if v == fn] for fn in missing}
        detail = "; ".join(f"{fn} (holding {fmt_keys(held[fn], 4)})" for fn in missing)
        raise MissingFileError(f"{index} refers to missing file(s): {detail}")
    return _Located(kind, root, [root / fn for fn in files], config, index, wm)


def _hf_weights(root: Path) -> _Located | None:
    cfg = root / "config.json"
    for stem, ext in (("model", "safetensors"), ("pytorch_model", "bin")):
        index = root / f"{stem}.{ext}.index.json"
        if index.exists():
            return _from_index(root, index, "hf", cfg)
        single = root / f"{stem}.{ext}"
        if single.is_file():
            return _Located("hf", root, [single], cfg)
        shards = _shard_set(root, stem, ext)
        if shards:
            return _Located("hf", root, shards, cfg)
    return None


def _mistral_weights(root: Path) -> _Located | None:
    cfg = root / "params.json"
    index = root / "consolidated.safetensors.index.json"
    if index.exists():
        return _from_index(root, index, "mistral", cfg)
    single = root / "consolidated.safetensors"
    if single.is_file():
        return _Located("mistral", root, [single], cfg)
    shards = _shard_set(root, "consolidated", "safetensors")
    if shards:
        return _Located("mistral", root, shards, cfg)
    release = _release_set(root)
    if release:
        return _Located("mistral", root, release, cfg)
    return None


def _locate(path: Path, layout: str | None) -> _Located:
    if layout not in (None, "hf", "mistral"):
        raise ValueError(f"layout must be None (detect), 'hf' or 'mistral', got {layout!r}")
    if not path.exists():
        raise MissingFileError(f"no checkpoint at {path}: it does not exist")
    if path.is_file():
        root = path.parent
        if path.name.endswith(".index.json"):
            kind = "mistral" if path.name.startswith("consolidated") else "hf"
            cfg = root / ("params.json" if kind == "mistral" else "config.json")
            return _from_index(root, path, kind, cfg)
        if path.name in ("config.json", "params.json"):
            return _locate(root, layout or ("hf" if path.name == "config.json" else "mistral"))
        if path.suffix in SAFETENSORS_SUFFIXES + TORCH_SUFFIXES:
            order = ["params.json", "config.json"] if path.name.startswith("consolidated") else ["config.json", "params.json"]
            if layout:
                order = ["config.json" if layout == "hf" else "params.json"]
            cfg = next((root / n for n in order if (root / n).is_file()), None)
            return _Located("state-dict", root, [path], cfg)
        raise CheckpointError(f"unknown checkpoint layout: {path} is not a tensor file (.safetensors, .pt, .pth, "
                              f".bin), an index (*.index.json), config.json/params.json or a checkpoint directory")
    root = path
    has_cfg, has_params = (root / "config.json").is_file(), (root / "params.json").is_file()
    tries = {"hf": (has_cfg, _hf_weights), "mistral": (has_params, _mistral_weights)}
    order = [layout] if layout else ["hf", "mistral"]
    for name in order:
        ok, find = tries[name]
        if ok:
            found = find(root)
            if found is not None:
                return found
    for name in order:  # a config without weights, or weights without their config
        ok, find = tries[name]
        cfg = "config.json" if name == "hf" else "params.json"
        if ok:
            want = ("model.safetensors, model.safetensors.index.json + shards, or pytorch_model.bin" if name == "hf"
                    else "consolidated.safetensors, consolidated.00.pth, or consolidated.00.pt .. .07.pt")
            raise MissingFileError(f"{root / cfg} is there but no weights were found next to it (expected {want})")
        if find(root) is not None:
            raise MissingFileError(f"{root} holds {name} weights but no {cfg}; the model's shape is in that file "
                                   f"(or pass args=ModelArgs(...) with the path of the weights file)")
    present = sorted(p.name for p in root.iterdir())
    raise CheckpointError(
        f"unknown checkpoint layout in {root}: found {present[:15]}{' ...' if len(present) > 15 else ''}; expected "
        f"config.json + model.safetensors (Hugging Face, possibly sharded with model.safetensors.index.json), "
        f"params.json + consolidated.safetensors / consolidated.00.pth (Mistral), or params.json + "
        f"consolidated.00.pt .. .07.pt (original Mistral release)")


def _read_config(loc: _Located) -> ModelArgs:
    f = loc.config_file
    if f is None:
        raise MissingFileError(f"no config.json or params.json next to {loc.files[0]}; pass args=ModelArgs(...) "
                               f"to say what shape of model the weights are for")
    try:
        cfg = json.loads(f.read_text())
    except FileNotFoundError:
        raise MissingFileError(f"config file {f} does not exist") from None
    except ValueError as e:
        raise CheckpointError(f"config file {f} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"config file {f} does not hold a JSON object")
    try:
        if f.name == "params.json":
            return args_from_params(cfg)
        if cfg.get("model_type", "mixtral") != "mixtral" and "num_local_experts" not in cfg:
            raise CheckpointError(f"config file {f} is for model_type {cfg.get('model_type')!r}, not a Mixtral")
        return args_from_hf_config(cfg)
    except KeyError as e:
        raise CheckpointError(f"config file {f} lacks the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"config file {f} is not a valid Mixtral config: {e}") from None


# --------------------------------------------------------------------------------------------
# An opened, validated checkpoint

_ALIGN = 64  # bytes; torch's CPU allocator aligns to 64 too


def _allocate(wanted: dict[str, Tensor], dtype, device, one_buffer: bool,
              into: torch.UntypedStorage | None = None) -> dict[str, Tensor]:
    """Uninitialised destination tensors: one allocation each, or views of one shared buffer.

    With ``one_buffer``, ``into`` (a storage on ``device``) is used as that buffer when it has
    room (its contents are overwritten); otherwise a new one is allocated.
    """
    if not one_buffer:
        return {k: torch.empty(v.shape, dtype=dtype or v.dtype, device=device) for k, v in wanted.items()}
    offsets, total = {}, 0
    for k, v in wanted.items():
        dt = dtype or v.dtype
        offsets[k] = total
        total += -(-v.numel() * dt.itemsize // _ALIGN) * _ALIGN
    if into is not None and into.device == torch.empty(0, device=device).device and into.nbytes() >= total:
        buf = torch.empty(0, dtype=torch.uint8, device=device).set_(into)  # (nbytes,) uint8 over `into`
    else:
        buf = torch.empty(total, dtype=torch.uint8, device=device)
    out = {}
    for k, v in wanted.items():
        dt = dtype or v.dtype
        n = v.numel() * dt.itemsize
        out[k] = buf[offsets[k]:offsets[k] + n].view(dt).view(v.shape)
    return out


def _is_pure_view(v: Tensor, mapped: set[int], dtype, device: torch.device) -> bool:
    """Can ``v`` be used as a parameter as it is: a contiguous, 64-byte aligned view of a mapped
    file, of the dtype asked for, on the CPU (see ``CheckpointReader.read_layer_views``)?

    The alignment matters: CPU matmul kernels (fp32 matrix-vector products in particular) may
    sum in another order when the weight's address is not aligned, so an unaligned view could
    change the logits in the last bit; a copy is always 64-byte aligned."""
    return (device.type == "cpu" and v.device.type == "cpu" and (dtype is None or v.dtype == dtype)
            and v.is_contiguous() and v.data_ptr() % ALIGN == 0 and v.untyped_storage().data_ptr() in mapped)


_EMBED = {"hf": "model.embed_tokens.weight", "hf-fused": "model.embed_tokens.weight"}
_GATE0 = {"hf": "model.layers.0.block_sparse_moe.gate.weight", "hf-fused": "model.layers.0.mlp.gate.weight",
          "mistral": "layers.0.feed_forward.gate.weight", "mistral-stacked": "layers.0.block_sparse_moe.gate.weight",
          "moe_lab": "blocks.0.moe.gate.weight"}
_FIELD_NAMES = {  # moe_lab field -> (config.json name, params.json name)
    "n_layers": ("num_hidden_layers", "n_layers"), "vocab_size": ("vocab_size", "vocab_size"),
    "dim": ("hidden_size", "dim"), "n_experts": ("num_local_experts", "moe.num_experts"),
}


class CheckpointReader:
    """A checkpoint opened memory-mapped and fully validated; reads moe_lab tensors a layer at a time.

    ``load_model`` and :class:`moe_lab.checkpoints.streaming.StreamingMixtral` are built on it. Attributes:
    ``path``, ``kind`` ("hf" / "mistral" / "state-dict"), ``style`` (key names, see
    :mod:`moe_lab.checkpoints.layouts`), ``config_file``, ``args`` (the full model's), ``files``, ``store``.
    """

    def __init__(self, path, *, args: ModelArgs | None = None, layout: str | None = None):
        self.path = Path(path).expanduser()
        loc = _locate(self.path, layout)
        self.kind, self.root, self.files = loc.kind, loc.root, loc.files
        self.config_file = loc.config_file if args is None else None
        self.index_file = loc.index_file
        self.args = args if args is not None else _read_config(loc)
        opened = []
        try:
            for p in loc.files:
                opened.append(open_tensor_file(p))
            self.store = TensorStore(opened, loc.weight_map, loc.index_file)
        except BaseException:
            for f in opened:
                f.close()
            raise
        try:
            self.style = detect_style(self.store.keys())
            if self.style is None:
                raise CheckpointError(f"the tensors in {self._where()} are not a Mixtral's: keys "
                                      f"{fmt_keys(self.store.keys(), 6)} match none of the known name styles")
            self._validate()
        except BaseException:
            self.close()
            raise

    # ---- validation (headers only; nothing is read)

    def _where(self) -> str:
        if len(self.files) == 1:
            return str(self.files[0])
        return f"{self.root} ({len(self.files)} files: {self.files[0].name} .. {self.files[-1].name})"

    def _config_name(self) -> str:
        return str(self.config_file) if self.config_file else "args"

    def _field(self, name: str) -> str:
        if self.config_file is None:
            return name
        return _FIELD_NAMES[name][0 if self.config_file.name == "config.json" else 1]

    def _disagree(self, items: list[str]) -> CheckpointError:
        return CheckpointError(f"the config ({self._config_name()}) disagrees with the weights in {self._where()}: "
                               + "; ".join(items))

    def _validate(self):
        args, style, store = self.args, self.style, self.store
        keys = [k for k in store.keys() if not IGNORED_KEY.search(k)]
        # 1. the config's main sizes against what the weights say
        layers = sorted({L for k in keys if (L := layer_of(k, style)) is not None})
        problems = []
        if layers and layers[-1] + 1 != args.n_layers:
            problems.append(f"{self._field('n_layers')}={args.n_layers} but the weights hold layers "
                            f"{layers[0]}..{layers[-1]} ({len(layers)} layers)")
        embed = _EMBED.get(style, "tok_embeddings.weight")
        if embed in store and len(store.info(embed).shape) == 2:
            V, D = store.info(embed).shape
            if V != args.vocab_size:
                problems.append(f"{self._field('vocab_size')}={args.vocab_size} but {embed} in "
                                f"{store.file_of(embed).name} has {V} rows")
            if D != args.dim:
                problems.append(f"{self._field('dim')}={args.dim} but {embed} in {store.file_of(embed).name} "
                                f"has {D} columns")
        gate = _GATE0[style]
        if gate in store and len(store.info(gate).shape) == 2 and store.info(gate).shape[0] != args.n_experts:
            problems.append(f"{self._field('n_experts')}={args.n_experts} but {gate} in {store.file_of(gate).name} "
                            f"has {store.info(gate).shape[0]} rows (one per expert)")
        if problems:
            raise self._disagree(problems)
        # 2. every key the config implies, with its shape
        expected = expected_shapes(args, style)
        missing = [k for k in expected if k not in store]
        if missing:
            raise CheckpointError(f"missing keys in {self._where()}: {len(missing)} key(s) the config "
                                  f"({self._config_name()}) requires are absent: {fmt_keys(missing)}")
        unexpected = [k for k in keys if k not in expected]
        if unexpected:
            detail = "; ".join(f"{k!r} in {store.file_of(k).name}" for k in sorted(unexpected)[:12])
            raise CheckpointError(f"unexpected keys in {self._where()}: {len(unexpected)} key(s) that a {style!r} "
                                  f"Mixtral checkpoint does not have: {detail}"
                                  + (" ..." if len(unexpected) > 12 else ""))
        wrong = [(k, shape, store.info(k).shape) for k, shape in expected.items() if store.info(k).shape != shape]
        if wrong:
            detail = "; ".join(f"{k} in {store.file_of(k).name}: expected {list(e)}, found {list(f)}" for k, e, f in wrong[:12])
            more = f" ... ({len(wrong)} in all)" if len(wrong) > 12 else ""
            raise CheckpointError(f"shape mismatch: {len(wrong)} tensor(s) in {self._where()} do not have the shape "
                                  f"the config ({self._config_name()}) implies (the config and the weights disagree): "
                                  f"{detail}{more}")
        bad = [k for k in expected if not store.info(k).dtype.is_floating_point]
        if bad:
            raise CheckpointError(f"tensors with non-floating-point dtypes in {self._where()} (quantised checkpoints "
                                  f"are not supported): " + "; ".join(f"{k}: {store.info(k).dtype}" for k in bad[:12]))

    # ---- what to read

    @property
    def n_layers(self) -> int:
        return self.args.n_layers

    @property
    def default_dtype(self) -> torch.dtype:
        """The checkpoint's dtype (that of the embedding matrix)."""
        return self.store.info(_EMBED.get(self.style, "tok_embeddings.weight")).dtype

    @property
    def nbytes(self) -> int:
        return sum(self.store.info(k).nbytes for k in self.store.keys())

    def layer_ids(self, layers=None) -> list[int]:
        """``None`` -> all layers; an int n -> the first n; a list/range -> those layer indices."""
        n = self.args.n_layers
        if layers is None:
            return list(range(n))
        if isinstance(layers, bool):
            raise CheckpointError(f"layers must be an int or a list of layer indices, got {layers!r}")
        if isinstance(layers, int):
            if not 1 <= layers <= n:
                raise CheckpointError(f"layers={layers} is out of range: {self._where()} has {n} layers "
                                      f"(ask for 1..{n}, or a list of indices in 0..{n - 1})")
            return list(range(layers))
        try:
            ids = [int(i) for i in layers]
        except (TypeError, ValueError):
            raise CheckpointError(f"layers must be an int or a list of layer indices, got {layers!r}") from None
        if not ids:
            raise CheckpointError("layers is empty: ask for at least one layer")
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise CheckpointError(f"layers {bad} out of range: {self._where()} has {n} layers (0..{n - 1})")
        if len(set(ids)) != len(ids):
            raise CheckpointError(f"layers {ids} lists a layer more than once")
        return ids

    def _read(self, src_layer: int | None, dst_layer: int, dtype, device, one_buffer: bool = False,
              into: torch.UntypedStorage | None = None, zero_copy: bool = False) -> tuple[dict[str, Tensor], list[str]]:
        """Read the globals (``src_layer=None``) or one layer: ``(tensors, keys of mapped views)``."""
        style, store = self.style, self.store
        raw = {k: store.get(k) for k in store.keys() if layer_of(k, style) is None and not IGNORED_KEY.search(k)}
        layer_raw = {}
        if src_layer is not None:
            layer_raw = {rename_layer(k, style, src_layer, 0): store.get(k) for k in store.keys()
                         if layer_of(k, style) == src_layer and not IGNORED_KEY.search(k)}
        converted = from_style({**raw, **layer_raw}, self.args.replace(n_layers=0 if src_layer is None else 1), style)
        if src_layer is None:
            wanted = {k: v for k, v in converted.items() if not k.startswith("blocks.")}
            sources = raw
        else:
            wanted = {f"blocks.{dst_layer}." + k[len("blocks.0."):]: v for k, v in converted.items() if k.startswith("blocks.0.")}
            sources = layer_raw
        mapped = {v.untyped_storage().data_ptr() for k, v in sources.items()
                  if store.mapped(k if src_layer is None else rename_layer(k, style, 0, src_layer))}
        device = torch.device(device)
        views = [k for k, v in wanted.items() if zero_copy and _is_pure_view(v, mapped, dtype, device)]
        kept = {wanted[k].untyped_storage().data_ptr() for k in views}  # mapped memory now in use
        out = {k: wanted[k] for k in views}
        dests = _allocate({k: v for k, v in wanted.items() if k not in out}, dtype, device, one_buffer, into)
        for k, dest in dests.items():
            v = wanted[k]
            dest.copy_(v)
            out[k] = dest
            if v.untyped_storage().data_ptr() in mapped - kept:  # a view of a mapped file: drop its pages now
                release_pages(v)
        for k, v in sources.items():  # e.g. q/k, read through a permuting copy
            if v.untyped_storage().data_ptr() in mapped - kept:
                release_pages(v)
        return {k: out[k] for k in wanted}, views

    def read_globals(self, dtype=None, device="cpu") -> dict[str, Tensor]:
        """``tok_embeddings.weight``, ``norm.weight``, ``output.weight`` (moe_lab names)."""
        return self._read(None, 0, as_dtype(dtype), device)[0]

    def read_layer(self, layer: int, as_index: int | None = None, dtype=None, device="cpu", *,
                   one_buffer: bool = False, into: torch.UntypedStorage | None = None) -> dict[str, Tensor]:
        """Layer ``layer`` of the checkpoint under the names ``blocks.{as_index}.*`` (default: same index).

        ``one_buffer=True`` puts all of the layer's tensors in one allocation (views of it), so
        that freeing the layer hands the memory straight back to the OS; the streaming forward
        uses it (many separate frees fragment the C heap and the RSS creeps up layer by layer).
        ``into`` (with ``one_buffer``): a storage to reuse as that allocation when it is big
        enough, e.g. ``previous["blocks.0.attn.wq.weight"].untyped_storage()``. Its contents are
        OVERWRITTEN, so the caller must make sure no tensor still in use lives in it (see
        :class:`moe_lab.checkpoints.streaming.StreamingMixtral`, which checks). Writing into
        pages already touched is ~5x faster than into fresh ones, which the OS maps and zeroes
        page by page on first write.
        """
        return self.read_layer_views(layer, as_index, dtype, device, one_buffer=one_buffer, into=into,
                                     zero_copy=False)[0]

    def read_layer_views(self, layer: int, as_index: int | None = None, dtype=None, device="cpu", *,
                         one_buffer: bool = False, into: torch.UntypedStorage | None = None,
                         zero_copy: bool = True) -> tuple[dict[str, Tensor], list[str]]:
        """``read_layer``, except that tensors needing no conversion are not copied (``zero_copy``).

        A tensor is used *as it is in the memory-mapped file* (no copy, nothing read until
        touched) when it is a pure view: the file is memory-mapped, its dtype is the one asked
        for, the layout conversion is a rename or a contiguous slice (HF experts w1/w2/w3,
        wv/wo, the router, the norms; mistral layouts: everything), its data is 64-byte aligned
        in the file (as in files written by :func:`moe_lab.save_model`; a safetensors file
        written elsewhere is aligned only if its header length happens to make it so), and
        ``device`` is the CPU.
        Everything else (the q/k RoPE row permutation of HF layouts, dtype casts, another
        device) is copied as in ``read_layer``. Returns ``(tensors, keys that are views of the
        mapped file)``.

        The mappings are private (copy-on-write: ``MAP_PRIVATE``), so writing into such a view
        never reaches the file; the written pages become private to this process until
        :func:`moe_lab.checkpoints.files.release_pages` (``touching=True``) drops them, which
        also undoes the writes. The caller frees those pages when it is done with the layer
        (:class:`moe_lab.checkpoints.streaming.StreamingMixtral` does).
        """
        if not 0 <= layer < self.n_layers:
            raise CheckpointError(f"layer {layer} out of range: {self._where()} has {self.n_layers} layers")
        return self._read(layer, layer if as_index is None else as_index, as_dtype(dtype), device, one_buffer, into,
                          zero_copy)

    def close(self):
        store = getattr(self, "store", None)
        if store is not None:
            store.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return (f"CheckpointReader({str(self.path)!r}, kind={self.kind!r}, style={self.style!r}, "
                f"n_layers={self.n_layers}, files={len(self.files)}, {self.nbytes / 1e6:.1f} MB)")


# --------------------------------------------------------------------------------------------
# Public API


def load_model(path, *, dtype=None, device="cpu", layers=None, args: ModelArgs | None = None,
               layout: str | None = None) -> Mixtral:
    """Load a Mixtral checkpoint of any supported layout (see the module docstring).

    Args:
        path: a checkpoint directory, or a file in one (weights file, index, config).
        dtype: convert every tensor to this dtype while reading (``torch.bfloat16``, ``"bf16"``...);
            None keeps the checkpoint's dtype.
        device: where the parameters are created ("cpu", "cuda", "cuda:1", ...; "auto" is the GPU
            when PyTorch sees one, else the CPU). Every moe_lab function then runs where the
            model is (:mod:`moe_lab.devices`).
        layers: None for all layers; an int n for the first n; a list/range of layer indices for
            those layers (in that order). The model then has that many blocks;
            ``model.layer_ids`` says which layers of the checkpoint they are.
        args: the model's shape, for a bare weights file without config.json / params.json.
        layout: "hf" or "mistral" to choose when a directory holds both.

    Raises :class:`CheckpointError` (a ``ValueError``; ``MissingFileError`` is also a
    ``FileNotFoundError``) naming the file and keys for anything wrong, before any weights are
    read. No partly loaded model is ever returned.
    """
    dtype = as_dtype(dtype)
    device = pick_device(device)
    with CheckpointReader(path, args=args, layout=layout) as reader:
        ids = reader.layer_ids(layers)
        dtype = dtype or reader.default_dtype
        try:
            sd = reader.read_globals(dtype, device)
            for i, L in enumerate(ids):
                sd.update(reader.read_layer(L, i, dtype, device))
        except CheckpointError:
            raise
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"reading the weights from {reader._where()} failed: {e}") from e
        model_args = reader.args.replace(n_layers=len(ids))
    model = meta_model(model_args)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:  # pragma: no cover - validation above should make this impossible
        raise CheckpointError(f"the weights from {path} do not fit the model: {e}") from None
    model.layer_ids = ids
    return model.eval()


def save_model(model: Mixtral, path, *, layout: str = "hf", max_shard_size: int | str | None = None) -> Path:
    """Save ``model`` as a checkpoint directory ``path``.

    ``layout="hf"``: ``config.json`` + ``model.safetensors`` with hub names and q/k rows in
    "rotate_half" order, which ``transformers.MixtralForCausalLM.from_pretrained`` loads.
    ``layout="mistral"``: ``params.json`` + ``consolidated.safetensors`` (mistral-inference).
    ``max_shard_size`` (bytes, or a string like ``"10MB"``, ``"5GB"``) splits the weights into
    shards ``model-00001-of-0000n.safetensors`` (``consolidated-...`` for mistral) plus an index.

    Atomic: everything is written into a temporary directory next to ``path`` which replaces
    ``path`` only once complete; on failure nothing is left behind. An existing ``path`` is
    replaced only when it holds nothing but checkpoint files.
    """
    if layout not in ("hf", "mistral"):
        raise ValueError(f"layout must be 'hf' or 'mistral', got {layout!r}")
    args = model.args
    sd = model.state_dict()
    meta = [k for k, v in sd.items() if v.device.type == "meta"]
    if meta:
        raise CheckpointError(f"cannot save: {len(meta)} tensors are on the meta device (no data): {fmt_keys(meta, 4)}")
    dtype = model.output.weight.dtype
    dtype_name = str(dtype).removeprefix("torch.")
    if layout == "hf":
        tensors = to_hf_state_dict(sd, args, fused=False)
        config_name, config = "config.json", hf_config_dict(args)
        config["torch_dtype"] = config["dtype"] = dtype_name
        stem, index_name = "model", "model.safetensors.index.json"
    else:
        tensors = to_mistral_state_dict(sd, args)
        config_name, config = "params.json", params_dict(args)
        stem, index_name = "consolidated", "consolidated.safetensors.index.json"
    with atomic_directory(Path(path).expanduser()) as tmp:
        (tmp / config_name).write_text(json.dumps(config, indent=2) + "\n")
        write_safetensors(tensors, tmp, stem, max_shard_size, metadata={"format": "pt"}, index_name=index_name)
    return Path(path).expanduser()


@dataclass
class CheckpointInfo:
    """What :func:`describe_checkpoint` found: layout, key style, config, and every tensor."""

    path: Path
    kind: str
    style: str
    config_file: Path | None
    index_file: Path | None
    args: ModelArgs
    files: list[tuple[str, int]]  # (name, bytes on disk)
    tensors: list[TensorInfo] = field(repr=False)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def table(self, pattern: str | None = None, limit: int | None = None) -> str:
        """A text table of key, shape, dtype, file (keys matching the regex ``pattern``)."""
        rows = [t for t in self.tensors if pattern is None or re.search(pattern, t.key)]
        shown = rows[:limit] if limit else rows
        w = max([len(t.key) for t in shown] + [3])
        lines = [f"{'key':<{w}}  {'shape':<18} {'dtype':<9} file"]
        for t in shown:
            lines.append(f"{t.key:<{w}}  {str(list(t.shape)):<18} {str(t.dtype).removeprefix('torch.'):<9} {t.file.name}")
        if len(shown) < len(rows):
            lines.append(f"... {len(rows) - len(shown)} more")
        return "\n".join(lines)


def describe_checkpoint(path, *, args: ModelArgs | None = None, layout: str | None = None) -> CheckpointInfo:
    """Validate a checkpoint and list its layout and tensors without reading any weights."""
    with CheckpointReader(path, args=args, layout=layout) as r:
        tensors = sorted((r.store.info(k) for k in r.store.keys()), key=lambda t: natural_key(t.key))
        return CheckpointInfo(path=Path(path), kind=r.kind, style=r.style, config_file=r.config_file,
                              index_file=r.index_file, args=r.args,
                              files=[(p.name, p.stat().st_size) for p in r.files], tensors=tensors)
