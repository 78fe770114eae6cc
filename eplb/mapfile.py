"""Statistics and expert-map files: MindSpeed-RL's JSON formats and SGLang's, read and written.

Four kinds of file (docs/formats.md describes each):

* ``mindspeed-stats``: MindSpeed-RL token statistics, ``token_collects_all.json``,
  ``{"<layer>": {"<expert>": <tokens>, ...}, ...}``.
* ``mindspeed-map``: MindSpeed-RL expert map, ``{"moe_layer_count": L, "layer_list": [...]}``.
* ``sglang-stats``: an SGLang expert-distribution dump (``.pt`` or ``.json``) holding
  ``logical_count`` ``[..., L, E]``, summed over the leading axes.
* ``sglang-map``: SGLang's ``--init-expert-location`` file, ``{"physical_to_logical_map":
  [[R ints] x L]}``.

Statistics are read as ``[L, E]`` int64 token counts, maps as ``phy2log`` ``[L, R]`` int64 (slot
``p`` of a map with ``P`` devices lives on device ``p // (R / P)``). Every writer checks what it
writes with its reader's rules, so a file written here always loads, and writes atomically
(:mod:`eplb.fileio`). Every reader error is a ``ValueError`` that starts with the file's path and
names the layer, device (or slot, or expert) and value at fault.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from eplb.checks import MAX_SLOTS, LayoutError, int_tensor, positive_int, readable
from eplb.fileio import atomic_write_bytes, atomic_write_text
from eplb.maps import as_layers, expert_counts

__all__ = [
    "FORMATS",
    "KINDS",
    "TOKEN_STATS_FILE",
    "convert_file",
    "detect_format",
    "expert_map_to_json",
    "load_expert_map",
    "load_map",
    "load_sglang_map",
    "load_sglang_stats",
    "load_stats",
    "load_token_stats",
    "parse_expert_map",
    "save_expert_map",
    "save_sglang_map",
    "save_sglang_stats",
    "save_token_stats",
]

TOKEN_STATS_FILE = "token_collects_all.json"
FORMATS = ("mindspeed", "sglang")
KINDS = ("mindspeed-stats", "mindspeed-map", "sglang-stats", "sglang-map")
_TORCH_SUFFIXES = (".pt", ".pth")
_INT64_MAX = (1 << 63) - 1
_DIGITS = re.compile(r"[0-9]+")

PathLike = str | os.PathLike[str]


# ----------------------------------------------------------------------------- reading helpers


@contextlib.contextmanager
def _about(path: PathLike) -> Iterator[None]:
    """Prefix the message of any ``ValueError`` raised inside with ``path``."""
    try:
        yield
    except ValueError as exc:
        raise ValueError(f"{os.fspath(path)}: {exc}") from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``json`` object hook: a key given twice is an error, not a silent overwrite."""
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise ValueError(f"key {key!r} appears twice in one JSON object")
        doc[key] = value
    return doc


def _resolve(path: PathLike) -> Path:
    """A folder stands for the ``token_collects_all.json`` inside it (MindSpeed-RL's layout)."""
    p = Path(path)
    return p / TOKEN_STATS_FILE if p.is_dir() else p


def _read(path: Path) -> Any:
    """The parsed document: ``torch.load`` (tensors only) for ``.pt``/``.pth``, else JSON."""
    if path.suffix in _TORCH_SUFFIXES:
        data = path.read_bytes()
        try:
            # weights_only: a statistics file must never run code when it is read.
            return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad file; all mean "bad file"
            raise ValueError(f"not a readable torch file ({type(exc).__name__}: {exc})") from None
    text = path.read_text(encoding="utf-8")
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None


def _kind(doc: Any) -> str:
    """Which of :data:`KINDS` a parsed document is (by its keys)."""
    if not isinstance(doc, dict):
        raise ValueError(
            f"expected a JSON object (statistics or an expert map), got {type(doc).__name__}"
        )
    if "physical_to_logical_map" in doc:
        return "sglang-map"
    if "logical_count" in doc:
        return "sglang-stats"
    if "moe_layer_count" in doc or "layer_list" in doc:
        return "mindspeed-map"
    # A dict with some numeric key is read as token statistics, so that a malformed one gets a
    # precise message from the statistics reader.
    if not doc or any(isinstance(k, str) and _DIGITS.fullmatch(k) for k in doc):
        return "mindspeed-stats"
    raise ValueError(
        f"not token statistics nor an expert map (keys {sorted(map(str, doc))[:5]}): expected "
        "MindSpeed-RL statistics {layer: {expert: tokens}}, a MindSpeed-RL map (moe_layer_count, "
        "layer_list), or SGLang's logical_count / physical_to_logical_map"
    )


def _index_key(key: str, what: str) -> int:
    """A JSON key that must be a non-negative decimal integer (a layer or expert number)."""
    if not _DIGITS.fullmatch(key):
        raise ValueError(f"{what} key {key!r} is not a non-negative integer")
    return int(key)


def _dumps(obj: Any, depth: int = 0) -> str:
    """JSON, indented, with every list or object of plain values on one line."""
    if isinstance(obj, dict) and any(isinstance(v, (dict, list)) for v in obj.values()):
        pad = "  " * (depth + 1)
        items = [f"{pad}{json.dumps(str(k))}: {_dumps(v, depth + 1)}" for k, v in obj.items()]
        return "{\n" + ",\n".join(items) + "\n" + "  " * depth + "}"
    if isinstance(obj, list) and any(isinstance(v, (dict, list)) for v in obj):
        pad = "  " * (depth + 1)
        items = [pad + _dumps(v, depth + 1) for v in obj]
        return "[\n" + ",\n".join(items) + "\n" + "  " * depth + "]"
    return json.dumps(obj)


def _write_doc(path: PathLike, doc: dict[str, Any]) -> Path:
    """Write ``doc`` atomically: ``torch.save`` for ``.pt``/``.pth`` paths, else JSON."""
    if Path(path).suffix in _TORCH_SUFFIXES:
        buffer = io.BytesIO()
        torch.save({k: torch.as_tensor(v) for k, v in doc.items()}, buffer)
        return atomic_write_bytes(path, buffer.getvalue())
    return atomic_write_text(path, _dumps(doc) + "\n")


def _checked_counts(name: str, counts: object) -> torch.Tensor:
    """Token counts as a CPU int64 ``[L, E]`` tensor, every value >= 0."""
    c = readable(name, int_tensor(name, counts, convert=True))
    if c.dim() != 2:
        raise ValueError(f"{name} must be 2-D [layers, experts], got shape {tuple(c.shape)}")
    c = c.detach().to("cpu", torch.int64)
    if c.numel() and int(c.min()) < 0:
        layer, expert = (c < 0).nonzero()[0].tolist()
        raise ValueError(
            f"{name} holds {int(c[layer, expert])} tokens for layer {layer}, expert {expert}; "
            "counts are >= 0"
        )
    return c


def _check_ids(p: torch.Tensor, per_device: int | None) -> int:
    """Check a parsed map ``p`` [L, R] int64; return the expert count E = max id + 1.

    Every id must lie in ``[0, R)`` (a layer with R slots cannot hold more than R experts) and
    every layer must hold every expert ``0..E-1``. ``per_device``: slots per device, used to name
    the device of a bad slot (None names the slot instead).
    """
    num_slots = p.shape[1]

    def where(layer: int, slot: int) -> str:
        if per_device is None:
            return f"layer {layer}, slot {slot}"
        return f"layer {layer}, device {slot // per_device}"

    bad = (p < 0) | (p >= num_slots)
    if bool(bad.any()):
        layer, slot = bad.nonzero()[0].tolist()
        value = int(p[layer, slot])
        if value < 0:
            raise ValueError(f"{where(layer, slot)}: expert id {value} is negative")
        raise ValueError(
            f"{where(layer, slot)}: expert id {value} is too large: a layer has {num_slots} "
            f"slots and every expert needs one, so ids are below {num_slots}"
        )
    num_experts = int(p.max()) + 1
    present = expert_counts(p, num_experts) > 0
    if not bool(present.all()):
        layer, expert = (~present).nonzero()[0].tolist()
        holder = "slot" if per_device is None else "device"
        raise ValueError(
            f"layer {layer}: expert {expert} is on no {holder} (every layer must hold each of "
            f"the experts 0..{num_experts - 1})"
        )
    return num_experts


# ------------------------------------------------------------------- MindSpeed-RL statistics


def _parse_token_stats(doc: Any, num_experts: int | None) -> torch.Tensor:
    """``{"<layer>": {"<expert>": tokens}}`` -> [L, E] int64; layers must be 0..L-1."""
    if not isinstance(doc, dict):
        raise ValueError(
            "token statistics must be a JSON object {layer: {expert: tokens}}, "
            f"got {type(doc).__name__}"
        )
    layers: dict[int, dict[int, int]] = {}
    top = -1
    for layer_key, experts in doc.items():
        layer = _index_key(layer_key, "layer")
        if layer in layers:
            raise ValueError(f"layer {layer} appears twice (key {layer_key!r})")
        if not isinstance(experts, dict):
            raise ValueError(
                f"layer {layer}: expected an object {{expert: tokens}}, "
                f"got {type(experts).__name__}"
            )
        row: dict[int, int] = {}
        for expert_key, tokens in experts.items():
            expert = _index_key(expert_key, f"layer {layer}: expert")
            if expert in row:
                raise ValueError(f"layer {layer}: expert {expert} appears twice")
            limit = MAX_SLOTS if num_experts is None else num_experts
            if expert >= limit:
                raise ValueError(f"layer {layer}: expert id {expert} is not below {limit}")
            if not _is_int(tokens) or not 0 <= tokens <= _INT64_MAX:
                raise ValueError(
                    f"layer {layer}, expert {expert}: token count {tokens!r} is not a "
                    "non-negative integer"
                )
            row[expert] = tokens
            top = max(top, expert)
        layers[layer] = row
    for layer in range(len(layers)):
        if layer not in layers:
            raise ValueError(
                f"layer {layer} is missing: layers must be numbered 0..{len(layers) - 1}, "
                f"got {sorted(layers)}"
            )
    width = top + 1 if num_experts is None else num_experts
    counts = torch.zeros(len(layers), width, dtype=torch.int64)
    for layer, row in layers.items():
        for expert, tokens in row.items():
            counts[layer, expert] = tokens
    return counts


def save_token_stats(path: PathLike, counts: torch.Tensor) -> Path:
    """Write MindSpeed-RL token statistics (``token_collects_all.json``) atomically.

    Args:
        path: the file to write (its folder must exist).
        counts: [L, E] integer tensor (any device) or nested list, tokens routed to every expert
            of every layer; >= 0.

    Returns:
        ``path`` as a ``Path``. Every expert is written, zeros included.
    """
    c = _checked_counts("counts", counts)
    doc = {
        str(layer): {str(expert): tokens for expert, tokens in enumerate(row)}
        for layer, row in enumerate(c.tolist())
    }
    return atomic_write_text(path, _dumps(doc) + "\n")


def load_token_stats(path: PathLike, num_experts: int | None = None) -> torch.Tensor:
    """Read MindSpeed-RL token statistics.

    Args:
        path: ``token_collects_all.json``, or the folder holding it.
        num_experts: E; default 1 + the largest expert id in the file.

    Returns:
        [L, E] int64 token counts (experts absent from a layer count 0). Layers must be numbered
        0..L-1; ``{}`` gives a ``[0, E]`` tensor (``E = 0`` without ``num_experts``).
    """
    if num_experts is not None:
        num_experts = positive_int("num_experts", num_experts, maximum=MAX_SLOTS)
    file = _resolve(path)
    with _about(file):
        return _parse_token_stats(_read(file), num_experts)


# ------------------------------------------------------------------------ MindSpeed-RL maps


def _parse_devices(layer_id: int, layer: dict[str, Any]) -> list[list[int]]:
    """``device_list`` of one layer -> expert lists indexed by device id."""
    count = layer["device_count"]
    if not _is_int(count) or count < 1:
        raise ValueError(
            f"layer {layer_id}: device_count must be a positive integer, got {count!r}"
        )
    devices = layer["device_list"]
    if not isinstance(devices, list):
        raise ValueError(
            f"layer {layer_id}: device_list must be a list, got {type(devices).__name__}"
        )
    if len(devices) != count:
        raise ValueError(
            f"layer {layer_id}: device_count is {count} but device_list holds "
            f"{len(devices)} devices"
        )
    by_id: list[list[int] | None] = [None] * count
    for pos, device in enumerate(devices):
        here = f"layer {layer_id}, device_list[{pos}]"
        if not isinstance(device, dict):
            raise ValueError(f"{here} must be an object, got {type(device).__name__}")
        for key in ("device_id", "device_expert"):
            if key not in device:
                raise ValueError(f"{here} lacks key {key!r}")
        device_id = device["device_id"]
        if not _is_int(device_id) or not 0 <= device_id < count:
            raise ValueError(
                f"{here}: device_id {device_id!r} is not one of 0..{count - 1} "
                "(device ids must be 0..device_count-1)"
            )
        if by_id[device_id] is not None:
            raise ValueError(f"layer {layer_id}: device_id {device_id} appears twice")
        experts = device["device_expert"]
        if not isinstance(experts, list):
            raise ValueError(
                f"layer {layer_id}, device {device_id}: device_expert must be a list, "
                f"got {type(experts).__name__}"
            )
        seen: set[int] = set()
        for expert in experts:
            if not _is_int(expert) or expert < 0:
                raise ValueError(
                    f"layer {layer_id}, device {device_id}: expert id {expert!r} is not a "
                    "non-negative integer"
                )
            if expert in seen:
                raise ValueError(
                    f"layer {layer_id}, device {device_id}: expert {expert} appears twice"
                )
            seen.add(expert)
        by_id[device_id] = experts
    return by_id  # type: ignore[return-value]  # every id 0..count-1 was filled exactly once


def parse_expert_map(doc: Any) -> tuple[torch.Tensor, int]:
    """Validate a parsed MindSpeed-RL expert map.

    Rules: the keys ``moe_layer_count`` / ``layer_list`` (and per layer ``layer_id`` /
    ``device_count`` / ``device_list``, per device ``device_id`` / ``device_expert``) are present
    with integer or list values; ``moe_layer_count`` equals the number of layers and layer ids are
    0..L-1; device ids are 0..device_count-1; every device of every layer holds the same positive
    number of experts, none twice; every layer holds every expert 0..E-1.

    Returns:
        phy2log: [L, R] int64, devices in id order, experts in file order within a device.
        num_gpus: the device count P (slot ``p`` is on device ``p // (R / P)``).

    Raises:
        ValueError: the first broken rule, naming the layer, device and value.
    """
    if not isinstance(doc, dict):
        raise ValueError(f"an expert map must be a JSON object, got {type(doc).__name__}")
    for key in ("moe_layer_count", "layer_list"):
        if key not in doc:
            raise ValueError(f"the expert map lacks key {key!r}")
    count, layers = doc["moe_layer_count"], doc["layer_list"]
    if not _is_int(count) or count < 0:
        raise ValueError(f"moe_layer_count must be a non-negative integer, got {count!r}")
    if not isinstance(layers, list):
        raise ValueError(f"layer_list must be a list, got {type(layers).__name__}")
    if count != len(layers):
        raise ValueError(f"moe_layer_count is {count} but layer_list holds {len(layers)} layers")
    if count == 0:
        raise ValueError("the expert map holds no layers (moe_layer_count is 0)")
    rows: dict[int, list[list[int]]] = {}
    for pos, layer in enumerate(layers):
        here = f"layer_list[{pos}]"
        if not isinstance(layer, dict):
            raise ValueError(f"{here} must be an object, got {type(layer).__name__}")
        for key in ("layer_id", "device_count", "device_list"):
            if key not in layer:
                raise ValueError(f"{here} lacks key {key!r}")
        layer_id = layer["layer_id"]
        if not _is_int(layer_id) or not 0 <= layer_id < count:
            raise ValueError(f"{here}: layer_id {layer_id!r} is not one of 0..{count - 1}")
        if layer_id in rows:
            raise ValueError(f"layer {layer_id} appears twice in layer_list")
        rows[layer_id] = _parse_devices(layer_id, layer)

    num_gpus, per_device = len(rows[0]), len(rows[0][0])
    for layer_id in range(count):
        if len(rows[layer_id]) != num_gpus:
            raise ValueError(
                f"layer {layer_id}: device_count {len(rows[layer_id])} differs from layer 0's "
                f"{num_gpus}"
            )
        for device_id, experts in enumerate(rows[layer_id]):
            if len(experts) != per_device:
                raise ValueError(
                    f"layer {layer_id}, device {device_id}: holds {len(experts)} experts but "
                    f"layer 0, device 0 holds {per_device}; every device must hold as many"
                )
    if per_device == 0:
        raise ValueError("layer 0, device 0: holds no experts")
    p = torch.tensor(
        [[e for experts in rows[layer_id] for e in experts] for layer_id in range(count)],
        dtype=torch.int64,
    )
    _check_ids(p, per_device)
    return p, num_gpus


def expert_map_to_json(phy2log: torch.Tensor, num_gpus: int) -> dict[str, Any]:
    """The MindSpeed-RL expert-map document of a placement.

    Args:
        phy2log: [L, R] (or [R]) integer, logical expert of every slot; L >= 1.
        num_gpus: P, dividing R; device ``g`` holds slots ``[g R/P, (g+1) R/P)``.

    Returns:
        ``{"moe_layer_count": L, "layer_list": [...]}``, checked with :func:`parse_expert_map`
        (so no expert twice on a device, every expert in every layer).
    """
    p = as_layers(phy2log)
    num_gpus = positive_int("num_gpus", num_gpus)
    num_layers, num_slots = p.shape
    if num_layers == 0 or num_slots == 0:
        raise ValueError(f"phy2log must hold at least one layer and slot, got {tuple(p.shape)}")
    if num_slots % num_gpus:
        raise LayoutError(f"num_gpus={num_gpus} does not divide the {num_slots} slots")
    per = num_slots // num_gpus
    doc = {
        "moe_layer_count": num_layers,
        "layer_list": [
            {
                "layer_id": layer,
                "device_count": num_gpus,
                "device_list": [
                    {"device_id": g, "device_expert": row[g * per : (g + 1) * per]}
                    for g in range(num_gpus)
                ],
            }
            for layer, row in enumerate(p.tolist())
        ],
    }
    parse_expert_map(doc)  # the writer enforces the reader's rules: a saved map always loads
    return doc


def save_expert_map(path: PathLike, phy2log: torch.Tensor, num_gpus: int) -> Path:
    """Write a MindSpeed-RL expert map atomically (see :func:`expert_map_to_json`).

    Args:
        path: the file to write (its folder must exist).
        phy2log: [L, R] integer placement; num_gpus: P, dividing R.

    Returns:
        ``path`` as a ``Path``.
    """
    return atomic_write_text(path, _dumps(expert_map_to_json(phy2log, num_gpus)) + "\n")


def load_expert_map(path: PathLike) -> torch.Tensor:
    """Read and validate a MindSpeed-RL expert map (rules: :func:`parse_expert_map`).

    Returns:
        phy2log: [L, R] int64 (the device count is ``parse_expert_map``'s second output, or
        :func:`load_map`'s).
    """
    with _about(path):
        return parse_expert_map(_read(Path(path)))[0]


# ---------------------------------------------------------------------------------- SGLang


def _array(doc: Any, key: str, what: str) -> torch.Tensor:
    """``doc[key]`` (a tensor or nested lists) as a tensor; ``doc`` must be an object with it."""
    if not isinstance(doc, dict) or key not in doc:
        raise ValueError(f"{what} must hold the key {key!r}")
    value = doc[key]
    try:
        return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{key} is not a rectangular array of numbers ({exc})") from None


def _parse_sglang_stats(doc: Any) -> torch.Tensor:
    """``logical_count`` [..., L, E] (tensor or nested list) -> [L, E] int64 (summed over the
    leading axes)."""
    t = _array(doc, "logical_count", "an SGLang expert-distribution dump")
    if t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"logical_count must hold token counts, got dtype {t.dtype}")
    if t.dim() < 2:
        raise ValueError(
            f"logical_count must have shape [..., layers, experts], got {tuple(t.shape)}"
        )
    if t.is_floating_point() and not bool((torch.isfinite(t) & (t == t.round())).all()):
        raise ValueError("logical_count must hold whole token counts")
    t = t.to("cpu", torch.int64)
    if t.numel() and int(t.min()) < 0:
        *_, layer, expert = (t < 0).nonzero()[0].tolist()
        raise ValueError(
            f"logical_count holds a negative count for layer {layer}, expert {expert}: "
            f"{int(t.min())}"
        )
    return t.reshape(-1, t.shape[-2], t.shape[-1]).sum(0)


def _parse_sglang_map(doc: Any) -> torch.Tensor:
    """``physical_to_logical_map`` [L, R] -> int64, validated (see :func:`load_sglang_map`)."""
    p = _array(doc, "physical_to_logical_map", "an SGLang map")
    if p.dim() != 2 or p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(
            f"physical_to_logical_map must be a non-empty [layers][slots] array, got shape "
            f"{tuple(p.shape)}"
        )
    if p.dtype.is_floating_point or p.is_complex() or p.dtype == torch.bool:
        raise ValueError(f"physical_to_logical_map must hold integer expert ids, got {p.dtype}")
    p = p.to("cpu", torch.int64)
    _check_ids(p, None)
    return p


def load_sglang_stats(path: PathLike) -> torch.Tensor:
    """Read an SGLang expert-distribution dump as statistics.

    Args:
        path: a ``.pt`` (loaded with ``weights_only=True``) or ``.json`` file holding a dict with
            ``logical_count`` of shape ``[..., L, E]`` (SGLang's stat recorder dumps
            ``[steps, L, E]``); other keys are ignored.

    Returns:
        [L, E] int64, ``logical_count`` summed over its leading axes.
    """
    with _about(path):
        return _parse_sglang_stats(_read(Path(path)))


def save_sglang_stats(path: PathLike, counts: torch.Tensor) -> Path:
    """Write ``{"logical_count": [[...E...] x L]}`` atomically (JSON, or ``torch.save`` for
    ``.pt``), a file SGLang's ``--init-expert-location`` accepts (it then runs its own EPLB).

    Args:
        path: the file to write; counts: [L, E] integer token counts, L >= 1.
    """
    c = _checked_counts("counts", counts)
    if c.shape[0] == 0:
        raise ValueError("counts holds no layers; SGLang needs [layers, experts]")
    return _write_doc(path, {"logical_count": c.tolist()})


def load_sglang_map(path: PathLike) -> torch.Tensor:
    """Read an SGLang ``--init-expert-location`` map.

    Args:
        path: ``.json`` or ``.pt`` file holding ``physical_to_logical_map`` ``[L, R]``.

    Returns:
        phy2log: [L, R] int64. Ids must lie in ``[0, R)`` and every layer must hold every expert
        ``0..E-1`` (E = largest id + 1); the format has no device count, so repeats on one
        device cannot be checked here.
    """
    with _about(path):
        return _parse_sglang_map(_read(Path(path)))


def save_sglang_map(path: PathLike, phy2log: torch.Tensor) -> Path:
    """Write ``{"physical_to_logical_map": [[...R...] x L]}`` atomically (JSON, or ``torch.save``
    for ``.pt``) for SGLang's ``--init-expert-location``.

    The file holds that one key only: SGLang passes the keys on as keyword arguments. SGLang also
    needs ``R = E + --ep-num-redundant-experts``, ``R`` a multiple of its EP size, and one row per
    layer of the model (dense layers included).

    Args:
        path: the file to write; phy2log: [L, R] integer placement (rules of
            :func:`load_sglang_map`).
    """
    p = as_layers(phy2log)
    if p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"phy2log must hold at least one layer and slot, got {tuple(p.shape)}")
    _check_ids(p, None)
    return _write_doc(path, {"physical_to_logical_map": p.tolist()})


# ------------------------------------------------------------------------- any format


def detect_format(path: PathLike) -> str:
    """Which of :data:`KINDS` a file is, from its content (a folder: its statistics file)."""
    file = _resolve(path)
    with _about(file):
        return _kind(_read(file))


def load_stats(path: PathLike) -> torch.Tensor:
    """Statistics from a file of either format (or a folder holding ``token_collects_all.json``).

    Returns:
        [L, E] int64 token counts.
    """
    file = _resolve(path)
    with _about(file):
        doc = _read(file)
        kind = _kind(doc)
        if kind == "mindspeed-stats":
            return _parse_token_stats(doc, None)
        if kind == "sglang-stats":
            return _parse_sglang_stats(doc)
        raise ValueError(f"this is an expert map ({kind}), not statistics")


def load_map(path: PathLike) -> tuple[torch.Tensor, int | None]:
    """An expert map of either format.

    Returns:
        phy2log: [L, R] int64.
        num_gpus: the device count of a MindSpeed-RL map; None for an SGLang map (it has none).
    """
    file = _resolve(path)
    with _about(file):
        doc = _read(file)
        kind = _kind(doc)
        if kind == "mindspeed-map":
            return parse_expert_map(doc)
        if kind == "sglang-map":
            return _parse_sglang_map(doc), None
        raise ValueError(f"these are statistics ({kind}), not an expert map")


def convert_file(
    src: PathLike, dst: PathLike, to: str | None = None, num_gpus: int | None = None
) -> str:
    """Convert statistics or a map between the MindSpeed-RL and SGLang formats.

    Args:
        src: a file of any of :data:`KINDS` (detected from its content).
        dst: the file to write (atomically).
        to: ``"mindspeed"`` or ``"sglang"``; default the other format than ``src``'s.
        num_gpus: devices of the written MindSpeed-RL map; needed when ``src`` is an SGLang map
            (which has no device count), else it must match ``src``'s.

    Returns:
        The kind written (one of :data:`KINDS`).
    """
    file = _resolve(src)
    with _about(file):
        doc = _read(file)
        family, what = _kind(doc).split("-")
        counts = phy2log = None
        src_gpus: int | None = None
        if what == "stats":
            counts = (
                _parse_token_stats(doc, None) if family == "mindspeed" else _parse_sglang_stats(doc)
            )
        elif family == "mindspeed":
            phy2log, src_gpus = parse_expert_map(doc)
        else:
            phy2log = _parse_sglang_map(doc)
    if to is None:
        to = "sglang" if family == "mindspeed" else "mindspeed"
    if to not in FORMATS:
        raise ValueError(f"to must be one of {FORMATS}, got {to!r}")
    if counts is not None:
        (save_token_stats if to == "mindspeed" else save_sglang_stats)(dst, counts)
        return f"{to}-stats"
    assert phy2log is not None
    if to == "sglang":
        save_sglang_map(dst, phy2log)
        return "sglang-map"
    if num_gpus is not None:
        num_gpus = positive_int("num_gpus", num_gpus)
        if src_gpus is not None and num_gpus != src_gpus:
            raise ValueError(f"num_gpus={num_gpus} but {os.fspath(src)} has {src_gpus} devices")
    gpus = num_gpus if num_gpus is not None else src_gpus
    if gpus is None:
        raise ValueError("an SGLang map has no device count: give num_gpus to write MindSpeed-RL")
    save_expert_map(dst, phy2log, gpus)
    return "mindspeed-map"
