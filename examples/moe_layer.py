"""A small but real MoE layer balanced by the LPLB Planner, with EPLB's token collector attached.

The layer: a router (linear -> softmax -> top-k, weights renormalised over the k picks), and
SwiGLU experts stored per *physical slot* (``w_gate``, ``w_up`` ``[S, hidden, ffn]``, ``w_down``
``[S, ffn, hidden]``, S = this process's slots). Its forward asks ``Planner.run`` to map every
token's logical expert ids to physical slots -- the original or its copy, split by the LP so that
the batch's per-rank load is even -- and computes each entry with the weights of its slot. A
copy holds the same weights as its original, so balancing changes where an entry is computed,
never the result.

Expert parallelism (``torchrun --nproc-per-node N``, one EP rank per process, gloo on CPU, NCCL
on GPUs): every rank routes its own tokens; the Planner sums the ranks' expert counts over the
group and solves one LP; the ranks all-gather tokens and slot ids, each computes the entries
that fall on its own slots, and an all-reduce of the per-entry outputs (each entry is nonzero on
exactly one rank, so the sum is exact) returns every token's expert outputs. Without torchrun,
one process simulates all ``--ep`` ranks (it holds every slot).

Run ``python examples/moe_layer.py --help``; docs/integration.md walks through the code.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import eplb
from lplb import CUBE_8P2E, Planner, ring

__all__ = ["ExpertBank", "MoELayer", "Router", "reference_moe"]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
# Balanced and unbalanced outputs differ only by rounding: a GEMM's result for one row may
# depend on how many rows it is computed with.
TOLERANCE = {
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float32: {"rtol": 1e-4, "atol": 1e-5},
    torch.bfloat16: {"rtol": 3e-2, "atol": 1e-2},
}


class Router(nn.Module):
    """Top-k softmax router: ``forward(x [T, hidden])`` -> ``(weights [T, k], ids [T, k])``,
    ids int64, weights renormalised over the k picks."""

    def __init__(self, hidden: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.gate(x).float(), dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        return (weights / weights.sum(-1, keepdim=True)).to(x.dtype), ids


class ExpertBank:
    """The logical experts' weights (what a checkpoint holds): SwiGLU ``gate``, ``up``
    ``[E, hidden, ffn]`` and ``down`` ``[E, ffn, hidden]``, drawn from ``seed`` so that every
    process builds the same bank."""

    def __init__(
        self,
        num_experts: int,
        hidden: int,
        ffn: int,
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        gen = torch.Generator().manual_seed(seed)

        def draw(*shape: int) -> torch.Tensor:  # scaled by 1/sqrt(fan-in): outputs of order 1
            w = torch.randn(*shape, generator=gen, dtype=torch.float64)
            return (w / shape[-2] ** 0.5).to(dtype)

        self.gate = draw(num_experts, hidden, ffn)
        self.up = draw(num_experts, hidden, ffn)
        self.down = draw(num_experts, ffn, hidden)

    def slots(self, experts: torch.Tensor) -> list[torch.Tensor]:
        """``[gate, up, down]`` of the logical ``experts`` ([S] ids), one row per slot."""
        ids = experts.to("cpu", torch.int64)
        return [w.index_select(0, ids) for w in (self.gate, self.up, self.down)]


def swiglu(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    """SwiGLU expert(s): ``(silu(x @ gate) * (x @ up)) @ down`` (batched over leading dims)."""
    return (F.silu(x @ gate) * (x @ up)) @ down


class MoELayer(nn.Module):
    """MoE layer whose experts live in physical slots laid out by an LPLB ``Planner``.

    Args:
        hidden: model width; the router and experts are built for it.
        bank: the logical experts' weights; this process's slots are copied from it.
        top_k: experts per token.
        planner: the layout (``planner.phy2log``) and the per-batch balancer. For expert
            parallelism over processes it must have been built with ``group`` = the EP group
            and ``ep_size`` = the group's size.
        rank, world_size: this process in the EP group (1 process: it holds every slot).
        group: the EP process group (None for one process).
        dispatch: ``"grouped"``: per local slot, ``index_select`` the entries routed to it and
            run them as one GEMM (no wasted work; the slot sizes are read on the host).
            ``"dense"``: one batched GEMM of every local slot over all tokens, then a gather
            of each entry's row (static shapes, no host synchronisation: what
            ``torch.compile(fullgraph=True)`` and CUDA graphs need).

    Attributes:
        balance: when False, every entry goes to its expert's original slot (the same layout
            without the LP split), for comparison.
        last_slot_load: [S] int64, entries computed by each local slot in the last forward.
        avail: [1] int64, LP groups solved so far (``Planner.run``'s counter).
    """

    def __init__(
        self,
        hidden: int,
        bank: ExpertBank,
        top_k: int,
        planner: Planner,
        *,
        rank: int = 0,
        world_size: int = 1,
        group: dist.ProcessGroup | None = None,
        dispatch: str = "grouped",
        device: torch.device | str = "cpu",
    ) -> None:
        super().__init__()
        if dispatch not in ("grouped", "dense"):
            raise ValueError(f"dispatch must be 'grouped' or 'dense', got {dispatch!r}")
        if world_size not in (1, planner.ep_size):
            raise ValueError(
                f"world_size must be 1 (one process holds every slot) or the Planner's ep_size "
                f"{planner.ep_size}, got {world_size}"
            )
        self.planner = planner
        self.top_k = top_k
        self.rank, self.world_size, self.group = rank, world_size, group
        self.dispatch = dispatch
        self.balance = True
        device = torch.device(device)
        self.router = Router(hidden, planner.n_logical, top_k).to(device, bank.gate.dtype)
        self.num_slots = planner.n_routed // world_size
        self.first_slot = rank * self.num_slots
        self.w_gate, self.w_up, self.w_down = (
            nn.Parameter(w.to(device), requires_grad=False) for w in bank.slots(self.experts)
        )
        self.register_buffer("avail", torch.zeros(1, dtype=torch.int64, device=device))
        # Planner.run's counting chunks, fixed here so that tracing never queries the device.
        self.n_sms = (
            torch.cuda.get_device_properties(device).multi_processor_count
            if device.type == "cuda"
            else 8
        )
        self.register_buffer(
            "last_slot_load", torch.zeros(self.num_slots, dtype=torch.int64, device=device)
        )
        self._original = planner.log2phy[:, 0].to(device, torch.int64)

    @property
    def experts(self) -> torch.Tensor:
        """[S] int64, the logical expert of each local slot under the Planner's layout."""
        stop = self.first_slot + self.num_slots
        return self.planner.phy2log[self.first_slot : stop].to("cpu", torch.int64)

    def slot_weights(self) -> list[torch.Tensor]:
        """The local slots' weights ``[w_gate, w_up, w_down]`` (what ``eplb.move_experts``
        moves in place when the layout changes)."""
        return [self.w_gate.data, self.w_up.data, self.w_down.data]

    def layout_changed(self) -> None:
        """Call after ``planner.update_redundancy_mapping`` once the slot weights are in place."""
        self._original = self.planner.log2phy[:, 0].to(self.w_gate.device, torch.int64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, hidden]`` (this rank's tokens) -> ``[T, hidden]``."""
        weights, ids = self.router(x)
        # Logical ids -> physical slots: the LP split, or every entry on its original slot.
        if self.balance:
            slots = self.planner.run(ids, self.avail, self.n_sms)
        else:
            slots = self._original[ids]
        tokens, flat_slots = x, slots.reshape(-1)
        if self.world_size > 1:
            tokens, flat_slots = self._all_gather(x), self._all_gather(flat_slots)
        y = self._expert_outputs(tokens, flat_slots)  # [N, hidden], zero off this rank
        if self.world_size > 1:
            dist.all_reduce(y, group=self.group)  # one nonzero term per entry: exact
            n = x.shape[0] * self.top_k
            y = y[self.rank * n : (self.rank + 1) * n]
        # Sum over the k picks in a fixed order, so the result does not depend on the slots.
        return (weights.unsqueeze(-1) * y.view(x.shape[0], self.top_k, -1)).sum(1)

    def _all_gather(self, t: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts)

    def _expert_outputs(self, tokens: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """[N, hidden] output of every entry whose slot is local (0 for the others).

        Args:
            tokens: [T, hidden] all tokens whose entries are in ``slots``.
            slots: [N = T * k] physical slot of every entry, token-major.
        """
        local = slots - self.first_slot
        mine = (local >= 0) & (local < self.num_slots)
        token_of = torch.arange(slots.numel(), device=slots.device) // self.top_k
        if self.dispatch == "dense":
            # Every local slot over every token: [S, T, hidden]; then each entry's row.
            out = swiglu(tokens.unsqueeze(0), self.w_gate, self.w_up, self.w_down)
            slot = local.clamp(0, self.num_slots - 1)
            y = out[slot, token_of] * mine.unsqueeze(-1).to(out.dtype)
            self.last_slot_load.zero_().index_add_(0, slot, mine.to(torch.int64))
            return y
        y = tokens.new_zeros(slots.numel(), tokens.shape[1])
        key = torch.where(mine, local, self.num_slots)  # foreign entries sort last
        order = torch.argsort(key, stable=True)
        sizes = torch.bincount(key, minlength=self.num_slots + 1)[: self.num_slots]
        self.last_slot_load.copy_(sizes)
        start = 0
        for s, size in enumerate(sizes.tolist()):  # one GEMM per local slot
            if size:
                rows = order[start : start + size]
                x_s = tokens.index_select(0, token_of[rows])
                y[rows] = swiglu(x_s, self.w_gate[s], self.w_up[s], self.w_down[s])
                start += size
        return y


def reference_moe(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, bank: ExpertBank
) -> torch.Tensor:
    """The layer's output computed token by token from the logical experts (a test oracle)."""
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            w = [p[e].to(x.device) for p in (bank.gate, bank.up, bank.down)]
            out[t] += weights[t, j] * swiglu(x[t], *w)
    return out


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="MoE layer with LPLB balancing and EPLB statistics. One process simulates "
        "all --ep ranks; under torchrun each process is one EP rank (gloo on CPU, NCCL on GPUs).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = parser.add_argument
    add("--experts", type=int, default=64, help="logical experts")
    add("--topk", type=int, default=4, help="experts per token")
    add("--hidden", type=int, default=128, help="model width")
    add("--ffn", type=int, default=256, help="expert hidden width")
    add("--ep", type=int, default=8, help="EP ranks without torchrun (under it: the world size)")
    add("--redundant", type=int, default=2, help="redundant slots per rank")
    add(
        "--topology",
        choices=("auto", "cube", "ring"),
        default="auto",
        help="cube: CUBE_8P2E (EP ranks a multiple of 8); ring: ring(EP ranks); auto: cube if "
        "it fits, else ring",
    )
    add("--tokens", type=int, default=512, help="tokens per batch per process")
    add("--batches", type=int, default=10, help="batches per phase (before/after the relayout)")
    add("--skew", type=float, default=2.0, help="std. dev. of the router's per-expert bias")
    add(
        "--dispatch",
        choices=("grouped", "dense"),
        default=None,
        help="default: grouped; dense with --compile or --cuda-graph",
    )
    add("--dtype", choices=sorted(DTYPES), default="float32", help="weights and activations")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add("--compile", action="store_true", help="run the layer under torch.compile")
    add("--cuda-graph", action="store_true", help="replay the layer from a CUDA graph")
    add("--stats-dir", default=None, help="flush the collected token statistics here")
    add("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.cuda_graph and (args.device == "cpu" or not torch.cuda.is_available()):
        parser.error("--cuda-graph needs a CUDA GPU")
    return args


def _setup(args: argparse.Namespace) -> tuple[torch.device, int, int, object]:
    """Device, rank, world size and EP group (torchrun sets WORLD_SIZE)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if world == 1:
        return torch.device("cuda" if use_cuda else "cpu"), 0, 1, None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    return device, dist.get_rank(), world, dist.group.WORLD


def rank_loads(layer: MoELayer) -> torch.Tensor:
    """[EP ranks] float64 entries computed by each EP rank in the layer's last forward."""
    load = layer.last_slot_load.view(-1, layer.planner.n_local_routed).sum(1)
    if layer.world_size > 1:
        parts = [torch.empty_like(load) for _ in range(layer.world_size)]
        dist.all_gather(parts, load, group=layer.group)
        load = torch.cat(parts)
    return load.cpu().double()


def build(args: argparse.Namespace, device: torch.device, rank: int, world: int, group):
    """The Planner, the expert bank and the layer, with a skewed router (same on every rank)."""
    ep = world if world > 1 else args.ep
    cube = args.topology == "cube" or (args.topology == "auto" and ep % 8 == 0)
    topology = CUBE_8P2E if cube else ring(ep)
    dispatch = args.dispatch or ("dense" if args.compile or args.cuda_graph else "grouped")
    planner = Planner(
        topology, args.experts + args.redundant * ep, args.experts, ep, group=group, num_nodes=1
    )
    bank = ExpertBank(args.experts, args.hidden, args.ffn, seed=args.seed, dtype=DTYPES[args.dtype])
    layer = MoELayer(
        args.hidden,
        bank,
        args.topk,
        planner,
        rank=rank,
        world_size=world,
        group=group,
        dispatch=dispatch,
        device=device,
    )
    gen = torch.Generator().manual_seed(args.seed)
    gate = torch.randn(args.experts, args.hidden, generator=gen) * args.hidden**-0.5
    # Feature 0 of every token is 1 (see `tokens`), so column 0 is a per-expert bias: a skew of
    # a few units makes some experts far more popular than others, as real routers are.
    gate[:, 0] += args.skew * torch.randn(args.experts, generator=gen)
    with torch.no_grad():
        layer.router.gate.weight.copy_(gate)
    return planner, bank, layer


def tokens(
    gen: torch.Generator,
    n: int,
    hidden: int,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """[n, hidden] random tokens whose feature 0 is 1 (the router's bias feature)."""
    x = torch.randn(n, hidden, generator=gen, dtype=torch.float64)
    x[:, 0] = 1.0
    return x.to(device, dtype)


class Runner:
    """Runs the layer eagerly, under torch.compile, or by replaying a CUDA graph."""

    def __init__(self, layer: MoELayer, compile: bool, cuda_graph: bool, example: torch.Tensor):
        self.layer = layer
        # Not fullgraph: on the CPU, TokenCollector.record reads the ids to validate them (a
        # graph break); the layer itself compiles with fullgraph=True (tests/test_example_*).
        self.forward = torch.compile(layer) if compile else layer
        self.use_graph = cuda_graph
        self.static_x = example.clone()
        self.capture()

    def capture(self) -> None:
        """(Re-)capture the graph: a graph holds the Planner's maps of its capture time."""
        if not self.use_graph:
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up outside the graph, as capture requires
            for _ in range(2):
                self.forward(self.static_x)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_out = self.forward(self.static_x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_graph:
            return self.forward(x)
        self.static_x.copy_(x)
        self.graph.replay()
        return self.static_out.clone()


def relayout(layer: MoELayer, history: torch.Tensor) -> tuple[int, eplb.MoveStats]:
    """New Planner layout from a load history [E]; the slot weights move to it (collective).

    Returns the number of slots whose expert changed and this rank's move statistics.
    """
    planner = layer.planner
    old = planner.phy2log.to("cpu", torch.int64).clone()
    planner.update_redundancy_mapping(history.cpu())
    new = planner.phy2log.to("cpu", torch.int64)
    stats = eplb.move_experts(layer.slot_weights(), old, new, layer.group)
    layer.layout_changed()
    return int((old != new).sum()), stats


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    device, rank, world, group = _setup(args)
    say = print if rank == 0 else (lambda *a, **k: None)
    planner, bank, layer = build(args, device, rank, world, group)
    collector = eplb.TokenCollector(1, args.experts, device=device)
    collector.attach(layer, [layer.router], topk_ids=1)  # the router returns (weights, ids)
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank + 1)
    runner = Runner(
        layer,
        args.compile,
        args.cuda_graph,
        tokens(gen, args.tokens, args.hidden, device, DTYPES[args.dtype]),
    )
    collector.reset()  # forget the warm-up and capture runs
    say(
        f"MoE layer: {args.experts} experts, top-{args.topk}, {planner.ep_size} EP ranks x "
        f"{planner.n_local_routed} slots; {world} process(es) on {device}, dispatch "
        f"{layer.dispatch}{', torch.compile' if args.compile else ''}"
        f"{', CUDA graph' if args.cuda_graph else ''}"
    )
    for phase in ("layout without history", "layout from the collected statistics"):
        imbalance = {False: 0.0, True: 0.0}
        for _ in range(args.batches):
            x = tokens(gen, args.tokens, args.hidden, device, DTYPES[args.dtype])
            layer.balance, collector.enabled = False, False  # the same layout, originals only
            plain = layer(x)
            imbalance[False] += float((load := rank_loads(layer)).max() / load.mean())
            layer.balance, collector.enabled = True, True
            out = runner(x)
            imbalance[True] += float((load := rank_loads(layer)).max() / load.mean())
            # The copies hold the originals' weights: balancing must not change the output.
            torch.testing.assert_close(out, plain, **TOLERANCE[out.dtype])
        say(
            f"  {phase}: max/mean rank load over {args.batches} batches: originals only "
            f"{imbalance[False] / args.batches:.3f}, LPLB {imbalance[True] / args.batches:.3f} "
            f"(outputs equal)"
        )
        if phase == "layout without history":
            history = collector.counts()[0]  # this rank's tokens; summed over the group below
            if world > 1:
                dist.all_reduce(history, group=group)
            changed, stats = relayout(layer, history)
            for moved, expected in zip(
                layer.slot_weights(), bank.slots(layer.experts), strict=True
            ):
                assert torch.equal(moved.cpu(), expected), "moved weights differ from the bank"
            runner.capture()
            say(
                f"  relayout from the collector's counts: {changed} slots change, "
                f"eplb.move_experts on rank 0: {stats.bytes_received} bytes received, "
                f"{stats.bytes_copied} copied locally"
            )
    if args.stats_dir:
        path = collector.flush(args.stats_dir, group=group)
        say(f"  token statistics written to {path}")
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
