"""MoEAnalyzer: per-epoch timing of the four MoE phases and the load imbalance of the experts.

A MoE forward has four phases: routing (gate, top-k), communication (dispatch / combine
all-to-all), computation (the experts) and aggregation (weighted sum of expert outputs). The
analyzer times each (``with analyzer.time("routing"): ...`` or forward hooks from
:meth:`MoEAnalyzer.attach`), counts the tokens each expert receives (:meth:`record_tokens`) and
at :meth:`end_epoch` turns that into a report: per-phase seconds (mean and slowest rank), the
tokens per expert and the load imbalance, printed and written as one JSON file per epoch.

On a CUDA device the timings are CUDA events recorded on the current stream: no host
synchronisation per call, one ``torch.cuda.synchronize`` per epoch to read them. On the CPU they
are ``time.perf_counter`` intervals. Token counts accumulate on the analyzer's device.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from time import perf_counter
from typing import Any

import torch
import torch.distributed as dist

from eplb.checks import int_tensor, positive_int, process_group
from eplb.fileio import atomic_write_bytes, atomic_write_text
from eplb.metrics import coefficient_of_variation, normalized_variance

__all__ = ["PHASES", "MoEAnalyzer", "format_report", "load_imbalance"]

PHASES = ("routing", "communication", "computation", "aggregation")


def load_imbalance(tokens: torch.Tensor) -> dict[str, float]:
    """Imbalance of per-expert token totals.

    Args:
        tokens: [E] token totals ``s_i`` (any real dtype).

    Returns:
        ``normalized_variance`` = ``mean(((s_i - mu) / mu) ** 2)`` (0 = perfect balance),
        ``cv`` = its square root (standard deviation / mean), ``max_over_mean`` = ``max / mu``;
        all 0, 0 and 1 when no token was counted.
    """
    s = torch.as_tensor(tokens).to(torch.float64).reshape(-1)
    mean = float(s.mean()) if s.numel() else 0.0
    return {
        "normalized_variance": float(normalized_variance(s)),
        "cv": float(coefficient_of_variation(s)),
        "max_over_mean": float(s.max()) / mean if mean > 0 else 1.0,
    }


class _Timer:
    """An open interval of one phase: a CUDA event or a perf_counter reading."""

    __slots__ = ("phase", "start")

    def __init__(self, phase: str, start: Any) -> None:
        self.phase = phase
        self.start = start


class MoEAnalyzer:
    """Per-epoch performance report of a distributed MoE layer (or model).

    Args:
        num_experts: E, logical experts counted by :meth:`record_tokens`.
        world_size: ranks of the group passed to :meth:`end_epoch` (checked there).
        log_dir: parent folder of the run folder ``<log_dir>/moe_performance_<timestamp>``,
            created by rank 0 at its first report; one ``epoch_<n>.json`` per epoch.
        device: where counts and timings live; default the current CUDA device if there is
            one, else the CPU. A CUDA device times with CUDA events, the CPU with perf_counter.
        print_table: rank 0 prints the table at :meth:`end_epoch`.
        plots: rank 0 also writes ``experts_epoch_<n>.png`` (tokens per expert) and
            ``imbalance.png`` (normalised variance by epoch); needs matplotlib.
    """

    def __init__(
        self,
        num_experts: int,
        world_size: int = 1,
        *,
        log_dir: str | os.PathLike[str] = "moe_performance_logs",
        device: str | torch.device | None = None,
        print_table: bool = True,
        plots: bool = False,
    ) -> None:
        self.num_experts = positive_int("num_experts", num_experts)
        self.world_size = positive_int("world_size", world_size)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except (TypeError, RuntimeError):
            raise ValueError(f"device must name a torch device, got {device!r}") from None
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be a CPU or CUDA device, got {self.device}")
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise ValueError(f"device={device!r} but CUDA is not available")
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
        self.timing = "cuda_events" if self.device.type == "cuda" else "perf_counter"
        if plots and importlib.util.find_spec("matplotlib") is None:
            raise ImportError(
                "MoEAnalyzer(plots=True) needs matplotlib: pip install matplotlib "
                "(or the package's 'plot' extra)"
            )
        self.log_dir = Path(log_dir)
        self.print_table = bool(print_table)
        self.plots = bool(plots)
        self.run_dir: Path | None = None
        self.history: list[dict[str, Any]] = []  # per-epoch summaries (imbalance plot)
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []
        self._open: dict[tuple[int, str], list[_Timer]] = {}
        self.reset()

    # --------------------------------------------------------------------------- recording
    def reset(self) -> None:
        """Drop everything recorded since the last epoch end (history and hooks stay)."""
        self._tokens = torch.zeros(self.num_experts, dtype=torch.int64, device=self.device)
        self._invalid = torch.zeros((), dtype=torch.int64, device=self.device)
        self._seconds = dict.fromkeys(PHASES, 0.0)  # perf_counter totals
        self._calls = dict.fromkeys(PHASES, 0)
        self._events: dict[str, list[tuple[Any, Any]]] = {p: [] for p in PHASES}
        self._open.clear()

    @staticmethod
    def _checked_phase(phase: object) -> str:
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        return str(phase)

    def start(self, phase: str) -> _Timer:
        """Open an interval of ``phase`` (one of :data:`PHASES`); close it with :meth:`stop`."""
        phase = self._checked_phase(phase)
        if self.timing == "cuda_events":
            event = torch.cuda.Event(enable_timing=True)
            event.record(torch.cuda.current_stream(self.device))
            return _Timer(phase, event)
        return _Timer(phase, perf_counter())

    def stop(self, timer: _Timer) -> None:
        """Close an interval opened by :meth:`start`."""
        if not isinstance(timer, _Timer):
            raise TypeError(f"timer must come from start(), got {type(timer).__name__}")
        if self.timing == "cuda_events":
            end = torch.cuda.Event(enable_timing=True)
            end.record(torch.cuda.current_stream(self.device))
            self._events[timer.phase].append((timer.start, end))
        else:
            self._seconds[timer.phase] += perf_counter() - timer.start
        self._calls[timer.phase] += 1

    @contextmanager
    def time(self, phase: str) -> Iterator[None]:
        """Time the enclosed block as one call of ``phase`` (one of :data:`PHASES`).

        With CUDA events this is the GPU time between the block's start and end on the current
        stream (work queued on other streams is not waited for).
        """
        timer = self.start(phase)
        try:
            yield
        finally:
            self.stop(timer)

    def record_tokens(
        self, topk_ids: torch.Tensor | None = None, *, counts: torch.Tensor | None = None
    ) -> None:
        """Count tokens per expert: give either ``topk_ids`` or ``counts``.

        Args:
            topk_ids: integer tensor of any shape (e.g. [tokens, top_k]) of expert ids;
                ``-1`` (a dropped token) is ignored.
            counts: integer tensor [..., E], tokens per expert (summed over leading axes).

        Ids outside ``[-1, E)`` or negative counts raise ``ValueError``: at once for CPU
        tensors, at :meth:`end_epoch` for CUDA tensors (checking them here would synchronise).
        """
        if (topk_ids is None) == (counts is None):
            raise TypeError("give exactly one of topk_ids or counts")
        if topk_ids is not None:
            ids = int_tensor("topk_ids", topk_ids).reshape(-1)
            bad = (ids < -1) | (ids >= self.num_experts)
            if not ids.is_cuda and bool(bad.any()):
                raise ValueError(
                    f"topk_ids holds {int(ids[bad][0])}; ids must be in [0, {self.num_experts}) "
                    "or -1"
                )
            ids = ids.to(self.device, torch.int64)
            valid = (ids >= 0) & (ids < self.num_experts)
            self._tokens.index_add_(0, ids.clamp(0, self.num_experts - 1), valid.to(torch.int64))
            if ids.is_cuda:
                self._invalid += bad.to(self.device).sum()
            return
        c = int_tensor("counts", counts)
        if c.dim() == 0 or c.shape[-1] != self.num_experts:
            raise ValueError(f"counts must be [..., {self.num_experts}], got {tuple(c.shape)}")
        c = c.reshape(-1, self.num_experts).to(torch.int64)
        negative = c < 0
        if not c.is_cuda and bool(negative.any()):
            raise ValueError(f"counts must be non-negative, got {int(c[negative][0])}")
        c = c.to(self.device)
        self._tokens += c.clamp(min=0).sum(0)
        if c.is_cuda:
            self._invalid += negative.to(self.device).sum()

    # --------------------------------------------------------------------------------- hooks
    def attach(
        self,
        model: torch.nn.Module,
        *,
        routing: Any = None,
        communication: Any = None,
        computation: Any = None,
        aggregation: Any = None,
        topk_ids: Callable[[Any], torch.Tensor] | None = None,
    ) -> None:
        """Time submodules of ``model`` through forward hooks, without changing the model.

        Args:
            model: the model (or MoE layer).
            routing, communication, computation, aggregation: the submodules whose forward is
                that phase: a dotted name within ``model`` (``"layers.0.gate"``), a module of
                ``model``, or a list of those.
            topk_ids: called with the output of each routing module, returns its expert ids
                (e.g. ``lambda out: out[1]``), which :meth:`record_tokens` counts.

        :meth:`detach` removes every hook again.
        """
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if topk_ids is not None and not callable(topk_ids):
            raise TypeError(f"topk_ids must be callable, got {type(topk_ids).__name__}")
        targets = {
            "routing": routing,
            "communication": communication,
            "computation": computation,
            "aggregation": aggregation,
        }
        if topk_ids is not None and routing is None:
            raise ValueError("topk_ids needs routing modules to read the expert ids from")
        resolved = [
            (phase, module)
            for phase, spec in targets.items()
            for module in self._resolve(model, phase, spec)
        ]
        for phase, module in resolved:
            key = (id(module), phase)
            self._hooks.append(module.register_forward_pre_hook(self._pre_hook(key, phase)))
            ids_from = topk_ids if phase == "routing" else None
            self._hooks.append(module.register_forward_hook(self._post_hook(key, ids_from)))

    @staticmethod
    def _resolve(model: torch.nn.Module, phase: str, spec: Any) -> list[torch.nn.Module]:
        if spec is None:
            return []
        items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
        members = {id(m) for m in model.modules()}
        modules = []
        for item in items:
            if isinstance(item, str):
                try:
                    module = model.get_submodule(item)
                except AttributeError:
                    raise ValueError(f"{phase}: model has no submodule {item!r}") from None
            elif isinstance(item, torch.nn.Module):
                if id(item) not in members:
                    raise ValueError(f"{phase}: {type(item).__name__} is not part of the model")
                module = item
            else:
                raise TypeError(f"{phase} must be a module name or module, got {item!r}")
            modules.append(module)
        return modules

    def _pre_hook(self, key: tuple[int, str], phase: str) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any) -> None:
            self._open.setdefault(key, []).append(self.start(phase))

        return hook

    def _post_hook(
        self, key: tuple[int, str], ids_from: Callable[[Any], torch.Tensor] | None
    ) -> Callable[..., None]:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            stack = self._open.get(key)
            if stack:  # empty after a reset() in the middle of a forward
                self.stop(stack.pop())
            if ids_from is not None:
                self.record_tokens(ids_from(output))

        return hook

    def detach(self) -> None:
        """Remove all hooks added by :meth:`attach`; the model is as before."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        self._open.clear()

    # ----------------------------------------------------------------------------- reporting
    def _local_seconds(self) -> dict[str, float]:
        """Per-phase seconds of this rank; reads the CUDA events after one synchronize."""
        if self.timing != "cuda_events":
            return dict(self._seconds)
        torch.cuda.synchronize(self.device)
        return {
            p: sum(start.elapsed_time(end) for start, end in pairs) / 1000.0
            for p, pairs in self._events.items()
        }

    def end_epoch(self, epoch: int, group: object = None) -> dict[str, Any]:
        """Close the epoch: gather, report, reset.

        Args:
            epoch: epoch number (>= 0), used in the report and the file name.
            group: a ``torch.distributed`` process group of ``world_size`` ranks: token counts
                are summed and timings gathered over it (every rank must call). ``None``: this
                process's numbers only.

        Returns:
            The report (same on every rank): ``epoch``, ``phases`` (per phase:
            ``seconds_per_rank``, ``mean_seconds``, ``max_seconds``, ``calls``,
            ``seconds_per_call``, ``share`` of the phases' mean total), ``tokens_per_expert``,
            ``total_tokens``, ``load_imbalance`` (:func:`load_imbalance`), and metadata.
            Rank 0 prints it and writes ``epoch_<n>.json`` (and plots) into :attr:`run_dir`.
        """
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")
        group = process_group("group", group)
        seconds = self._local_seconds()
        local = torch.tensor(
            [seconds[p] for p in PHASES] + [float(self._calls[p]) for p in PHASES],
            dtype=torch.float64,
        )
        tokens = self._tokens
        invalid = self._invalid
        rank = 0
        if group is not None:
            size = dist.get_world_size(group)
            if size != self.world_size:
                raise ValueError(f"group has {size} ranks but world_size={self.world_size}")
            rank = dist.get_rank(group)
            comm = torch.device("cpu")
            if dist.get_backend(group) == "nccl":  # NCCL moves CUDA tensors only
                comm = torch.device("cuda", torch.cuda.current_device())
            # Tokens and the invalid count in one all-reduce; timings gathered per rank.
            summed = torch.cat([tokens, invalid.reshape(1)]).to(comm)
            dist.all_reduce(summed, group=group)
            tokens, invalid = summed[:-1], summed[-1]
            parts = [torch.empty_like(local, device=comm) for _ in range(size)]
            dist.all_gather(parts, local.to(comm), group=group)
            per_rank = torch.stack([p.cpu() for p in parts])
        else:
            # This process's numbers only; in a distributed job only global rank 0 writes.
            per_rank = local[None]
            if dist.is_available() and dist.is_initialized():
                rank = dist.get_rank()
        bad = int(invalid)
        tokens = tokens.cpu()
        self.reset()
        if bad:
            raise ValueError(
                f"record_tokens saw {bad} expert ids outside [-1, {self.num_experts}) or "
                f"negative counts in epoch {epoch}"
            )
        report = self._report(epoch, per_rank, tokens)
        self.history.append(
            {"epoch": epoch, **report["load_imbalance"], "total_tokens": report["total_tokens"]}
        )
        if rank == 0:
            if self.print_table:
                print(format_report(report))
            self._write(report)
        return report

    def _report(self, epoch: int, per_rank: torch.Tensor, tokens: torch.Tensor) -> dict[str, Any]:
        num = len(PHASES)
        secs, calls = per_rank[:, :num], per_rank[:, num:]
        mean_secs = secs.mean(0)
        total_mean = float(mean_secs.sum())
        phases = {}
        for i, p in enumerate(PHASES):
            n = int(calls[:, i].sum())
            phases[p] = {
                "seconds_per_rank": secs[:, i].tolist(),
                "mean_seconds": float(mean_secs[i]),
                "max_seconds": float(secs[:, i].max()),
                "calls": n,
                "seconds_per_call": float(secs[:, i].sum()) / n if n else 0.0,
                "share": float(mean_secs[i]) / total_mean if total_mean > 0 else 0.0,
            }
        return {
            "epoch": epoch,
            "num_experts": self.num_experts,
            "world_size": int(per_rank.shape[0]),
            "timing": self.timing,
            "time": datetime.now().isoformat(timespec="seconds"),
            "phases": phases,
            "tokens_per_expert": tokens.tolist(),
            "total_tokens": int(tokens.sum()),
            "load_imbalance": load_imbalance(tokens),
        }

    def _ensure_run_dir(self) -> Path:
        if self.run_dir is None:
            stamp = datetime.now().strftime("%Y%m%d_%H%M%S")
            self.log_dir.mkdir(parents=True, exist_ok=True)
            for n in range(1000):  # two analyzers started in the same second get two folders
                folder = self.log_dir / (f"moe_performance_{stamp}" + (f"_{n}" if n else ""))
                try:
                    folder.mkdir()
                except FileExistsError:
                    continue
                self.run_dir = folder
                break
            else:
                raise FileExistsError(f"cannot create a run folder in {self.log_dir}")
        return self.run_dir

    def _write(self, report: dict[str, Any]) -> None:
        folder = self._ensure_run_dir()
        epoch = report["epoch"]
        atomic_write_text(folder / f"epoch_{epoch:04d}.json", json.dumps(report, indent=2) + "\n")
        if self.plots:
            self._plot(folder, report)

    def _plot(self, folder: Path, report: dict[str, Any]) -> None:
        try:
            from matplotlib.figure import Figure
        except ImportError as err:  # removed after construction
            raise ImportError("MoEAnalyzer plots need matplotlib: pip install matplotlib") from err
        tokens = report["tokens_per_expert"]
        fig = Figure(figsize=(max(6.0, 0.25 * len(tokens)), 3.5))
        ax = fig.add_subplot()
        ax.bar(range(len(tokens)), tokens)
        if tokens:
            ax.axhline(sum(tokens) / len(tokens), color="black", linestyle="--", label="mean")
            ax.legend()
        ax.set_xlabel("expert")
        ax.set_ylabel("tokens")
        ax.set_title(f"epoch {report['epoch']}: tokens per expert")
        _save_figure(fig, folder / f"experts_epoch_{report['epoch']:04d}.png")

        fig = Figure(figsize=(6.0, 3.5))
        ax = fig.add_subplot()
        epochs = [h["epoch"] for h in self.history]
        ax.plot(epochs, [h["normalized_variance"] for h in self.history], marker="o")
        ax.set_xlabel("epoch")
        ax.set_ylabel("normalised variance (0 = balanced)")
        ax.set_title("expert load imbalance")
        _save_figure(fig, folder / "imbalance.png")


def _save_figure(fig: Any, path: Path) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    atomic_write_bytes(path, buffer.getvalue())


def format_report(report: dict[str, Any]) -> str:
    """The text table :meth:`MoEAnalyzer.end_epoch` prints for a report."""
    imb = report["load_imbalance"]
    title = (
        f"Epoch {report['epoch']}: MoE performance ({report['num_experts']} experts, "
        f"{report['world_size']} ranks, {report['timing']})"
    )
    lines = ["=" * len(title), title, "=" * len(title)]
    lines.append(
        f"load imbalance: normalised variance {imb['normalized_variance']:.4f} (0 = perfect), "
        f"max/mean {imb['max_over_mean']:.3f}, CV {imb['cv']:.3f}"
    )
    lines.append("")
    lines.append(f"{'phase':<14}{'mean s':>12}{'max s':>12}{'calls':>9}{'s/call':>12}{'share':>8}")
    for phase, row in report["phases"].items():
        lines.append(
            f"{phase:<14}{row['mean_seconds']:>12.6f}{row['max_seconds']:>12.6f}"
            f"{row['calls']:>9d}{row['seconds_per_call']:>12.6f}{row['share']:>8.1%}"
        )
    lines.append("")
    tokens = report["tokens_per_expert"]
    total = report["total_tokens"]
    mean = total / len(tokens) if tokens else 0.0
    lines.append(f"{'expert':>6}{'tokens':>14}{'share':>8}{'/mean':>8}")
    for e, t in enumerate(tokens):
        share = t / total if total else 0.0
        lines.append(f"{e:>6}{t:>14d}{share:>8.1%}{(t / mean if mean else 0.0):>8.2f}")
    return "\n".join(lines)
