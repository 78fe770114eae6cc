"""Token statistics: how many tokens every expert of every MoE layer receives.

:class:`TokenCollector` keeps an ``[L, E]`` int64 counter on the device and adds each layer's
routed top-k ids to it with one ``index_add_``, without synchronising the host, so it can stay on
during real inference or training. ``flush`` sums the counters over the ranks and rank 0 writes
MindSpeed-RL's ``token_collects_all.json`` (docs/formats.md), the input of ``eplb generate-map``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eplb.checks import MAX_SLOTS, int_tensor, positive_int, process_group, readable
from eplb.mapfile import TOKEN_STATS_FILE, save_token_stats

__all__ = ["RouterHooks", "TokenCollector"]

# How a router's output becomes its top-k ids: None (the output is the ids), an index into a
# tuple/list output, a key (or attribute) name, or a function of the output.
IdsSelector = int | str | Callable[[Any], torch.Tensor] | None


class RouterHooks:
    """The forward hooks one :meth:`TokenCollector.attach` call registered.

    ``remove()`` (or leaving a ``with`` block) unregisters them; removing twice is harmless.
    """

    def __init__(self, handles: list[torch.utils.hooks.RemovableHandle]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def __len__(self) -> int:
        return len(self.handles)

    def __enter__(self) -> RouterHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _selector(topk_ids: IdsSelector) -> Callable[[Any], Any]:
    """The function that takes a router's output to its top-k ids (see ``IdsSelector``)."""
    if topk_ids is None:
        return lambda output: output
    if isinstance(topk_ids, bool):
        raise TypeError(f"topk_ids must be None, an int, a str or a callable, got {topk_ids!r}")
    if isinstance(topk_ids, int):
        return lambda output: output[topk_ids]
    if isinstance(topk_ids, str):
        return lambda output: (
            output[topk_ids] if isinstance(output, Mapping) else getattr(output, topk_ids)
        )
    if callable(topk_ids):
        return topk_ids
    raise TypeError(f"topk_ids must be None, an int, a str or a callable, got {topk_ids!r}")


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class TokenCollector:
    """Per-layer, per-expert token counters for MoE routing, kept on the device.

    Args:
        num_layers: L, MoE layers (numbered 0..L-1 in :meth:`record` and in the written file).
        num_experts: E, logical experts per layer.
        device: where the counters live; default the current CUDA device if CUDA is available,
            else the CPU. Ids recorded from another device are copied here first.
        enabled: when False, :meth:`record` returns at once, :meth:`attach` registers no hook
            and :meth:`flush` writes nothing: a disabled collector costs nothing. It is a plain
            attribute and can be flipped later.
        token_save_path: the folder :meth:`flush` writes ``token_collects_all.json`` into when
            it is given no path (set by :meth:`from_config`).

    Ids outside ``[0, E)`` other than -1 (which means "no expert" and is skipped) raise
    ``ValueError`` when the counters are on the CPU; on a GPU, checking would synchronise the
    host, so they are counted per layer in :attr:`invalid` instead (and ``flush`` warns).
    """

    def __init__(
        self,
        num_layers: int,
        num_experts: int,
        device: torch.device | str | int | None = None,
        enabled: bool = True,
        *,
        token_save_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.num_layers = positive_int("num_layers", num_layers, maximum=MAX_SLOTS)
        self.num_experts = positive_int("num_experts", num_experts, maximum=MAX_SLOTS)
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled must be a bool, got {enabled!r}")
        if token_save_path is not None and not isinstance(token_save_path, (str, os.PathLike)):
            raise TypeError(
                f"token_save_path must be a path or None, got {type(token_save_path).__name__}"
            )
        self.enabled = enabled
        self.token_save_path = token_save_path
        self.device = _default_device() if device is None else torch.device(device)
        # Columns 0..E-1 count the experts; column E counts invalid ids (GPU only) and column
        # E+1 swallows the -1 "no expert" entries, so that one index_add_ does all the work.
        self._buffer = torch.zeros(
            self.num_layers, self.num_experts + 2, dtype=torch.int64, device=self.device
        )
        self._one = torch.ones(1, dtype=torch.int64, device=self.device)
        self._hooks: list[RouterHooks] = []

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_config(
        cls,
        config: Mapping[str, Any] | str | os.PathLike[str],
        num_layers: int,
        num_experts: int,
        device: torch.device | str | int | None = None,
    ) -> TokenCollector:
        """A collector configured as in MindSpeed-RL.

        Args:
            config: a mapping, or the path of a YAML file holding one, with ``token_collects``
                (bool, default False) and ``token_save_path`` (folder; required when
                ``token_collects`` is true). When neither key is at the top level, they are read
                from a ``generate`` section (where MindSpeed-RL's YAML puts them).
            num_layers, num_experts, device: as for the constructor.

        Raises:
            ValueError: ``token_collects`` is true but ``token_save_path`` is missing or empty,
                or the YAML cannot be parsed. TypeError: wrong value types.
        """
        if isinstance(config, (str, os.PathLike)):
            import yaml

            text = Path(config).read_text(encoding="utf-8")
            try:
                loaded = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ValueError(f"{os.fspath(config)}: not valid YAML ({exc})") from None
            config = {} if loaded is None else loaded
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a mapping or a YAML path, got {type(config).__name__}")
        section = config
        generate = config.get("generate")
        own_keys = "token_collects" in config or "token_save_path" in config
        if not own_keys and isinstance(generate, Mapping):
            section = generate
        enabled = section.get("token_collects", False)
        if not isinstance(enabled, bool):
            raise TypeError(f"token_collects must be true or false, got {enabled!r}")
        path = section.get("token_save_path")
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"token_save_path must be a path, got {path!r}")
        if enabled and not path:
            raise ValueError("token_collects is true but token_save_path is not set")
        return cls(num_layers, num_experts, device, enabled, token_save_path=path or None)

    # ------------------------------------------------------------------ recording

    def record(self, layer: int, topk_ids: torch.Tensor) -> None:
        """Add the routed ids of one forward of ``layer`` to the counters.

        Args:
            layer: MoE layer, ``0 <= layer < L``.
            topk_ids: integer tensor of any shape (typically ``[tokens, top_k]``), expert ids in
                ``[0, E)``; -1 entries are skipped.

        Never synchronises the host when the counters are on a GPU (no ``.item()``, no
        ``bincount``): the count is one ``index_add_`` on the device.
        """
        if not self.enabled:
            return
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {layer!r}")
        if not 0 <= layer < self.num_layers:
            raise ValueError(f"layer must be in [0, {self.num_layers}), got {layer}")
        ids = readable("topk_ids", int_tensor("topk_ids", topk_ids)).reshape(-1)
        # non_blocking only towards a GPU: a non-blocking copy to the CPU may be read unfinished.
        ids = ids.to(self.device, torch.int64, non_blocking=self.device.type != "cpu")
        num_experts = self.num_experts
        if self.device.type == "cpu":
            if ids.numel():
                low, high = torch.aminmax(ids)
                if int(low) < -1 or int(high) >= num_experts:
                    bad = int(low) if int(low) < -1 else int(high)
                    raise ValueError(
                        f"layer {layer}: topk_ids holds expert {bad}; ids must be in "
                        f"[0, {num_experts}) or -1"
                    )
            column = torch.where(ids < 0, num_experts + 1, ids)
        else:
            valid = (ids >= -1) & (ids < num_experts)
            column = torch.where(valid, ids, num_experts)
            column = torch.where(ids == -1, num_experts + 1, column)
        self._buffer[layer].index_add_(0, column, self._one.expand(column.numel()))

    def attach(
        self,
        model: nn.Module,
        routers: Iterable[nn.Module | str] | Mapping[int, nn.Module | str],
        topk_ids: IdsSelector = None,
    ) -> RouterHooks:
        """Record every forward of the given router modules through forward hooks.

        Args:
            model: the model the routers belong to.
            routers: the router (gate) module of each MoE layer, as modules or as qualified
                names in ``model`` (``"layers.3.mlp.gate"``); a sequence gives layers 0, 1, ...,
                a mapping ``{layer: router}`` gives them explicitly.
            topk_ids: how to read the top-k ids from a router's output: None (the output is
                the ids), an int (index into a tuple/list output), a str (key of a dict output,
                or attribute name), or a function ``output -> ids`` (e.g.
                ``lambda logits: logits.topk(2).indices`` for a gate that returns logits).

        Returns:
            The registered hooks (none when the collector is disabled); ``remove()`` them, or
            call :meth:`detach` to remove every hook of this collector.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        select = _selector(topk_ids)
        pairs: Iterable[tuple[object, object]]
        if isinstance(routers, Mapping):
            pairs = routers.items()
        elif isinstance(routers, Iterable) and not isinstance(routers, str):
            pairs = enumerate(routers)
        else:
            raise TypeError(
                f"routers must be a sequence or a mapping of modules, got {type(routers).__name__}"
            )
        members = {id(m) for m in model.modules()}
        chosen: dict[int, tuple[int, nn.Module, str]] = {}
        for layer, router in pairs:
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise TypeError(f"router layers must be ints, got {layer!r}")
            if not 0 <= layer < self.num_layers:
                raise ValueError(f"router layer must be in [0, {self.num_layers}), got {layer}")
            label = router if isinstance(router, str) else type(router).__name__
            if isinstance(router, str):
                try:
                    router = model.get_submodule(router)
                except AttributeError:
                    raise ValueError(f"model has no submodule {label!r}") from None
            if not isinstance(router, nn.Module):
                raise TypeError(f"router of layer {layer} must be a module, got {router!r}")
            if id(router) not in members:
                raise ValueError(f"router of layer {layer} ({label}) is not a submodule of model")
            if id(router) in chosen:
                raise ValueError(
                    f"router {label} is given for layers {chosen[id(router)][0]} and {layer}"
                )
            chosen[id(router)] = (layer, router, label)
        if not self.enabled:
            return RouterHooks([])
        handles = [
            router.register_forward_hook(self._hook(layer, select, label))
            for layer, router, label in chosen.values()
        ]
        hooks = RouterHooks(handles)
        self._hooks.append(hooks)
        return hooks

    def _hook(self, layer: int, select: Callable[[Any], Any], label: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: object, output: object) -> None:
            ids = select(output)
            if not isinstance(ids, torch.Tensor):
                raise TypeError(
                    f"router of layer {layer} ({label}): its top-k ids are a "
                    f"{type(ids).__name__}, not a tensor; check attach's topk_ids"
                )
            self.record(layer, ids)

        return hook

    def detach(self) -> None:
        """Remove every hook :meth:`attach` registered."""
        for hooks in self._hooks:
            hooks.remove()
        self._hooks = []

    # ------------------------------------------------------------------ reading

    def counts(self) -> torch.Tensor:
        """[L, E] int64 tokens per layer and expert, on :attr:`device` (a copy)."""
        return self._buffer[:, : self.num_experts].clone()

    @property
    def invalid(self) -> torch.Tensor:
        """[L] int64 ids outside ``[0, E)`` (other than -1) recorded per layer (GPU only; on the
        CPU they raise instead), on :attr:`device` (a copy). Nonzero means lost tokens."""
        return self._buffer[:, self.num_experts].clone()

    def reset(self) -> None:
        """Zero the counters (and the invalid counts)."""
        self._buffer.zero_()

    def flush(
        self,
        token_save_path: str | os.PathLike[str] | None = None,
        group: object = None,
    ) -> Path | None:
        """Sum the counters over the ranks; rank 0 writes ``token_collects_all.json``.

        Every rank of ``group`` must call it (it is a collective when torch.distributed is
        initialised). The counters are not reset.

        Args:
            token_save_path: the folder to write into (created if missing); default the
                collector's ``token_save_path``.
            group: the process group to sum over; None means the default group (or no
                communication at all when torch.distributed is not initialised). The counters
                are copied to the backend's device where needed: to the current GPU for NCCL,
                to the CPU for gloo.

        Returns:
            The written file's path on the group's rank 0; None on other ranks and when the
            collector is disabled.
        """
        if not self.enabled:
            return None
        folder = token_save_path if token_save_path is not None else self.token_save_path
        if folder is None:
            raise ValueError("flush needs token_save_path (none was given or configured)")
        group = process_group("group", group)
        totals = self._buffer
        rank = 0
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank = dist.get_rank(group)
            if rank < 0:
                raise ValueError("this process is not a member of group")
            totals = self._buffer.clone()
            backend = dist.get_backend(group)
            if backend == "nccl" and totals.device.type != "cuda":
                totals = totals.to(torch.device("cuda", torch.cuda.current_device()))
            elif backend == "gloo" and totals.device.type != "cpu":
                totals = totals.cpu()
            dist.all_reduce(totals, group=group)
        elif group is not None:
            raise ValueError("a group was given but torch.distributed is not initialised")
        if rank != 0:
            return None
        totals = totals.cpu()
        invalid = totals[:, self.num_experts]
        if bool(invalid.any()):
            layers = invalid.nonzero().flatten().tolist()
            warnings.warn(
                f"{int(invalid.sum())} routed ids outside [0, {self.num_experts}) were not "
                f"counted (layers {layers}); see TokenCollector.invalid",
                RuntimeWarning,
                stacklevel=2,
            )
        os.makedirs(folder, exist_ok=True)
        return save_token_stats(Path(folder) / TOKEN_STATS_FILE, totals[:, : self.num_experts])
