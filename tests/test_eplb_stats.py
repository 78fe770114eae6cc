"""eplb.TokenCollector: counting against plain loops, configuration, hooks on a small real MoE
model, the cost of a disabled collector (counted tensor ops), and flush over gloo processes."""

from __future__ import annotations

import json
import socket
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import eplb
from eplb import TokenCollector

INT_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]


def plain_counts(batches: list[tuple[int, torch.Tensor]], num_layers: int, num_experts: int):
    """Reference: count every id >= 0 with Python loops."""
    counts = [[0] * num_experts for _ in range(num_layers)]
    for layer, ids in batches:
        for e in ids.reshape(-1).tolist():
            if e >= 0:
                counts[layer][e] += 1
    return counts


# ----------------------------------------------------------------------------- counting


@pytest.mark.parametrize("dtype", INT_DTYPES)
def test_record_matches_plain_loops(dtype):
    gen = torch.Generator().manual_seed(INT_DTYPES.index(dtype))
    low = 0 if dtype == torch.uint8 else -1
    collector = TokenCollector(3, 11, device="cpu")
    batches = []
    shapes = [(40, 4), (7,), (2, 5, 3), (0, 4), (1, 1)]
    for i, shape in enumerate(shapes * 2):
        ids = torch.randint(low, 11, shape, generator=gen).to(dtype)
        layer = i % 3
        collector.record(layer, ids)
        batches.append((layer, ids))
    counts = collector.counts()
    assert counts.dtype == torch.int64 and counts.shape == (3, 11)
    assert counts.tolist() == plain_counts(batches, 3, 11)
    assert collector.invalid.tolist() == [0, 0, 0]


def test_minus_one_is_skipped_and_counts_are_copies():
    collector = TokenCollector(1, 3, device="cpu")
    collector.record(0, torch.tensor([[-1, 2], [2, -1], [0, 2]]))
    counts = collector.counts()
    assert counts.tolist() == [[1, 0, 3]]
    counts += 100  # a copy: the collector is unaffected
    assert collector.counts().tolist() == [[1, 0, 3]]
    collector.reset()
    assert collector.counts().tolist() == [[0, 0, 0]]


@pytest.mark.parametrize("bad", [5, 17, -2, -100])
def test_out_of_range_ids_raise_on_cpu_and_count_nothing(bad):
    collector = TokenCollector(2, 5, device="cpu")
    collector.record(1, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=rf"layer 1: topk_ids holds expert {bad}; ids must be in"):
        collector.record(1, torch.tensor([[0, bad], [1, 2]]))
    assert collector.counts().tolist() == [[0] * 5, [1, 1, 0, 0, 0]]


def test_record_argument_errors():
    collector = TokenCollector(2, 4, device="cpu")
    with pytest.raises(ValueError, match=r"layer must be in \[0, 2\), got 2"):
        collector.record(2, torch.tensor([0]))
    with pytest.raises(ValueError, match=r"got -1"):
        collector.record(-1, torch.tensor([0]))
    with pytest.raises(TypeError, match="layer must be an int"):
        collector.record(True, torch.tensor([0]))
    with pytest.raises(TypeError, match=r"topk_ids .*dtype.*float32"):
        collector.record(0, torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match=r"topk_ids must be a torch\.Tensor"):
        collector.record(0, [0, 1])
    with pytest.raises(ValueError, match="topk_ids is a meta tensor"):
        collector.record(0, torch.empty(3, dtype=torch.int64, device="meta"))
    with pytest.raises(TypeError, match="num_layers"):
        TokenCollector(2.0, 4)
    with pytest.raises(ValueError, match="num_experts must be positive"):
        TokenCollector(2, 0)
    with pytest.raises(TypeError, match="enabled"):
        TokenCollector(2, 4, enabled="yes")
    assert collector.counts().sum() == 0


def test_one_layer_one_expert():
    collector = TokenCollector(1, 1, device="cpu")
    collector.record(0, torch.zeros(9, 2, dtype=torch.int32))
    collector.record(0, torch.full((3,), -1))
    assert collector.counts().tolist() == [[18]]


# --------------------------------------------------------------------------- configuration


def test_from_config_dict_and_yaml(tmp_path):
    on = TokenCollector.from_config(
        {"token_collects": True, "token_save_path": str(tmp_path)}, 2, 4, device="cpu"
    )
    assert on.enabled and on.token_save_path == str(tmp_path)
    off = TokenCollector.from_config({}, 2, 4, device="cpu")
    assert not off.enabled and off.token_save_path is None
    # MindSpeed-RL puts both keys under "generate".
    yaml_file = tmp_path / "cfg.yaml"
    yaml_file.write_text(
        f"model: x\ngenerate:\n  token_collects: true\n  token_save_path: {tmp_path / 'out'}\n"
    )
    from_yaml = TokenCollector.from_config(yaml_file, 2, 4, device="cpu")
    assert from_yaml.enabled and Path(from_yaml.token_save_path) == tmp_path / "out"
    (tmp_path / "empty.yaml").write_text("")
    assert not TokenCollector.from_config(str(tmp_path / "empty.yaml"), 2, 4).enabled


@pytest.mark.parametrize(
    ("config", "error", "message"),
    [
        ({"token_collects": True}, ValueError, "token_save_path is not set"),
        ({"token_collects": True, "token_save_path": ""}, ValueError, "token_save_path is not"),
        ({"generate": {"token_collects": True}}, ValueError, "token_save_path is not set"),
        ({"token_collects": "yes", "token_save_path": "x"}, TypeError, "true or false"),
        ({"token_collects": True, "token_save_path": 3}, TypeError, "token_save_path must be"),
        ([1, 2], TypeError, "config must be a mapping"),
    ],
)
def test_from_config_errors(config, error, message):
    with pytest.raises(error, match=message):
        TokenCollector.from_config(config, 2, 4, device="cpu")


def test_from_config_bad_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("generate: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        TokenCollector.from_config(tmp_path / "bad.yaml", 2, 4)
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(TypeError, match="config must be a mapping"):
        TokenCollector.from_config(tmp_path / "list.yaml", 2, 4)


# ------------------------------------------------------------------------- flush, 1 process


def test_flush_writes_the_counts_once_atomically(tmp_path):
    collector = TokenCollector(2, 3, device="cpu", token_save_path=tmp_path / "new" / "dir")
    collector.record(0, torch.tensor([[0, 2], [2, 2]]))
    collector.record(1, torch.tensor([1]))
    path = collector.flush()
    assert path == tmp_path / "new" / "dir" / "token_collects_all.json"
    assert json.loads(path.read_text()) == {
        "0": {"0": 1, "1": 0, "2": 3},
        "1": {"0": 0, "1": 1, "2": 0},
    }
    assert collector.counts().tolist() == [[1, 0, 3], [0, 1, 0]]  # flush does not reset
    other = collector.flush(tmp_path / "other")  # an explicit path wins
    assert other == tmp_path / "other" / "token_collects_all.json"
    assert torch.equal(eplb.load_token_stats(tmp_path / "other"), collector.counts())
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["token_collects_all.json"]


def test_flush_of_empty_counters_writes_zeros(tmp_path):
    path = TokenCollector(1, 2, device="cpu").flush(tmp_path)
    assert json.loads(path.read_text()) == {"0": {"0": 0, "1": 0}}


def test_flush_errors(tmp_path):
    with pytest.raises(ValueError, match="needs token_save_path"):
        TokenCollector(1, 2, device="cpu").flush()
    with pytest.raises(TypeError, match=r"group must be a torch\.distributed\.ProcessGroup"):
        TokenCollector(1, 2, device="cpu").flush(tmp_path, group="world")


def test_disabled_collector_writes_nothing(tmp_path):
    collector = TokenCollector(2, 3, device="cpu", enabled=False)
    collector.record(0, torch.tensor([1, 2]))
    collector.record(99, "not even checked")  # a disabled record returns before looking
    assert collector.counts().sum() == 0
    assert collector.flush(tmp_path / "out") is None
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------ a small real MoE model


class TopKRouter(nn.Module):
    """Softmax gate that returns (weights [T, k], ids [T, k]) like DeepSeek's MoEGate."""

    def __init__(self, dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=False)
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate(x).softmax(-1).topk(self.top_k, dim=-1)


class MoEBlock(nn.Module):
    def __init__(self, dim: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.router = TopKRouter(dim, num_experts, top_k)
        self.experts = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_experts))
        self.routed: list[torch.Tensor] = []  # the oracle: ids as the block itself used them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.router(x)
        self.routed.append(ids)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            token, slot = (ids == e).nonzero(as_tuple=True)
            out = out.index_add(0, token, weights[token, slot, None] * expert(x[token]))
        return x + out


class TinyMoE(nn.Module):
    def __init__(self, num_layers=3, dim=8, num_experts=6, top_k=2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(MoEBlock(dim, num_experts, top_k) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _model() -> TinyMoE:
    torch.manual_seed(0)
    return TinyMoE()


def _oracle(model: TinyMoE) -> list[list[int]]:
    batches = [(layer, ids) for layer, b in enumerate(model.blocks) for ids in b.routed]
    return plain_counts(batches, len(model.blocks), 6)


def test_attach_by_module_counts_what_the_model_routed():
    model = _model()
    collector = TokenCollector(3, 6, device="cpu")
    hooks = collector.attach(model, [b.router for b in model.blocks], topk_ids=1)
    assert len(hooks) == 3
    with torch.no_grad():
        for step in range(4):
            model(torch.randn(16 + step, 8))
    assert collector.counts().tolist() == _oracle(model)
    assert collector.counts().sum() == 3 * 2 * (16 + 17 + 18 + 19)
    hooks.remove()
    model(torch.randn(5, 8))
    assert collector.counts().sum() == 3 * 2 * (16 + 17 + 18 + 19)  # no longer recording


def test_attach_by_name_mapping_and_selectors():
    model = _model()
    collector = TokenCollector(4, 6, device="cpu")
    # Layer numbers chosen explicitly; names resolved in the model; ids read by a function of
    # the output (a gate returning logits would do the top-k here).
    with (
        collector.attach(
            model, {3: "blocks.0.router", 1: "blocks.2.router"}, topk_ids=lambda out: out[1]
        ),
        torch.no_grad(),
    ):
        model(torch.randn(10, 8))
    per_block = _oracle(model)
    assert collector.counts().tolist() == [[0] * 6, per_block[2], [0] * 6, per_block[0]]
    assert not any(b.router._forward_hooks for b in model.blocks)  # the with block removed them


class DictRouter(nn.Module):
    def forward(self, x):
        return {"topk_ids": x, "weights": None}


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.r = DictRouter()

    def forward(self, x):
        return self.r(x)


def test_attach_with_key_selector_and_detach():
    model = Holder()
    collector = TokenCollector(1, 4, device="cpu")
    collector.attach(model, [model.r], topk_ids="topk_ids")
    model(torch.tensor([[3, 3], [1, -1]]))
    assert collector.counts().tolist() == [[0, 1, 0, 2]]
    collector.detach()
    model(torch.tensor([[3, 3]]))
    assert collector.counts().tolist() == [[0, 1, 0, 2]]


def test_attach_errors():
    model, stranger = _model(), _model()
    collector = TokenCollector(3, 6, device="cpu")
    with pytest.raises(ValueError, match="not a submodule of model"):
        collector.attach(model, [stranger.blocks[0].router])
    with pytest.raises(ValueError, match=r"model has no submodule 'blocks\.9\.router'"):
        collector.attach(model, ["blocks.9.router"])
    with pytest.raises(ValueError, match="given for layers 0 and 1"):
        collector.attach(model, [model.blocks[0].router, model.blocks[0].router])
    with pytest.raises(ValueError, match=r"router layer must be in \[0, 3\), got 5"):
        collector.attach(model, {5: model.blocks[0].router})
    with pytest.raises(TypeError, match="topk_ids must be"):
        collector.attach(model, [model.blocks[0].router], topk_ids=1.5)
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        collector.attach("model", [])
    with pytest.raises(TypeError, match="routers must be"):
        collector.attach(model, "blocks.0.router")
    collector.attach(model, [model.blocks[0].router])  # the output is a tuple, not ids
    with pytest.raises(TypeError, match=r"router of layer 0 \(TopKRouter\): its top-k ids are a"):
        model(torch.randn(2, 8))


class CountOps(TorchDispatchMode):
    """Every tensor operation that reaches the dispatcher, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _forward_ops(model: nn.Module, x: torch.Tensor, extra=None) -> list[str]:
    with torch.no_grad(), CountOps() as counter:
        model(x)
        if extra is not None:
            extra()
    return counter.ops


def test_disabled_collector_adds_no_tensor_op_to_a_forward():
    model = _model()
    x = torch.randn(32, 8)
    plain = _forward_ops(model, x)
    assert len(plain) > 50  # the counter sees the forward's operations

    disabled = TokenCollector(3, 6, device="cpu", enabled=False)
    hooks = disabled.attach(model, [b.router for b in model.blocks], topk_ids=1)
    assert len(hooks) == 0 and not any(b.router._forward_hooks for b in model.blocks)
    ids = torch.randint(0, 6, (32, 2))
    with_disabled = _forward_ops(model, x, extra=lambda: disabled.record(0, ids))
    assert with_disabled == plain

    enabled = TokenCollector(3, 6, device="cpu")
    enabled.attach(model, [b.router for b in model.blocks], topk_ids=1)
    with_enabled = _forward_ops(model, x)
    assert len(with_enabled) > len(plain)  # the same counter does see a working collector
    assert enabled.counts().sum() == 3 * 32 * 2


# ------------------------------------------------------------------------ flush over gloo


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


L, E = 4, 10


def _rank_batches(rank: int) -> list[tuple[int, torch.Tensor]]:
    """The ids rank ``rank`` routes: its own seed, sizes and hot experts."""
    gen = torch.Generator().manual_seed(1000 + rank)
    batches = []
    for step in range(3 + rank):
        layer = step % L
        ids = torch.randint(-1, E, (20 + 7 * rank, 2), generator=gen)
        ids[ids == E - 1] = rank % E  # make each rank's load differ
        batches.append((layer, ids))
    return batches


def _flush_worker(rank: int, world: int, port: int, out: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        collector = TokenCollector(L, E, device="cpu")
        for layer, ids in _rank_batches(rank):
            collector.record(layer, ids)
        result = {"local": collector.counts(), "world": collector.flush(Path(out) / "all")}
        if world == 4:
            # A subgroup: its rank 0 (global rank 1) writes the sum over ranks 1..3.
            sub = dist.new_group([1, 2, 3])
            if rank != 0:
                result["sub"] = collector.flush(Path(out) / "sub", group=sub)
        result["after"] = collector.counts()
        torch.save(result, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn(fn, world: int, args: tuple, timeout: float = 120.0) -> None:
    """Run ``fn(rank, *args)`` in ``world`` spawned processes; kill them all after ``timeout``."""
    context = mp.start_processes(fn, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"flush over {world} processes did not finish in {timeout} s")


@pytest.mark.parametrize("world", [2, 4])
def test_flush_sums_every_rank(tmp_path, world):
    _spawn(_flush_worker, world, (world, _free_port(), str(tmp_path)))
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    expected = torch.zeros(L, E, dtype=torch.int64)
    for rank in range(world):
        local = torch.tensor(plain_counts(_rank_batches(rank), L, E))
        assert torch.equal(results[rank]["local"], local)
        assert torch.equal(results[rank]["after"], local)  # flush leaves the counters alone
        expected += local
    assert results[0]["world"] == tmp_path / "all" / "token_collects_all.json"
    assert all(r["world"] is None for r in results[1:])
    assert torch.equal(eplb.load_token_stats(tmp_path / "all", num_experts=E), expected)
    if world == 4:
        assert results[1]["sub"] == tmp_path / "sub" / "token_collects_all.json"
        assert results[2]["sub"] is None and results[3]["sub"] is None
        sub_expected = sum(torch.tensor(plain_counts(_rank_batches(r), L, E)) for r in (1, 2, 3))
        assert torch.equal(eplb.load_token_stats(tmp_path / "sub", num_experts=E), sub_expected)


# ------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
def test_gpu_record_never_syncs_and_counts_invalid_ids(tmp_path):
    collector = TokenCollector(2, 8, device="cuda")
    gen = torch.Generator().manual_seed(7)
    batches = [(i % 2, torch.randint(-1, 8, (64, 4), generator=gen)) for i in range(6)]
    gpu_batches = [(layer, ids.cuda().to(torch.int32)) for layer, ids in batches]
    bad = torch.tensor([[8, 3], [-5, 100], [-1, 2]], device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation now raises
    try:
        for layer, ids in gpu_batches:
            collector.record(layer, ids)
        collector.record(1, bad)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = plain_counts(batches, 2, 8)
    expected[1][3] += 1
    expected[1][2] += 1
    assert collector.counts().cpu().tolist() == expected
    assert collector.invalid.cpu().tolist() == [0, 3]  # 8, -5 and 100; -1 is skipped
    with pytest.warns(RuntimeWarning, match=r"3 routed ids outside \[0, 8\) .*layers \[1\]"):
        path = collector.flush(tmp_path)
    assert eplb.load_token_stats(path).tolist() == expected


@pytest.mark.gpu
def test_gpu_record_can_be_captured_in_a_cuda_graph():
    # A CUDA graph capture fails on any host synchronisation: the strictest check there is.
    collector = TokenCollector(2, 5, device="cuda")
    ids = torch.tensor([[4, 0], [-1, 9], [4, 4]], device="cuda", dtype=torch.int32)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        collector.record(1, ids)  # warm-up outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        collector.record(1, ids)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    assert collector.counts().cpu().tolist() == [[0] * 5, [4, 0, 0, 0, 12]]
    assert collector.invalid.cpu().tolist() == [0, 4]


@pytest.mark.gpu
def test_gpu_counters_take_cpu_ids():
    collector = TokenCollector(1, 3, device="cuda")
    collector.record(0, torch.tensor([2, 2, 0]))
    assert collector.counts().device.type == "cuda"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert collector.counts().cpu().tolist() == [[1, 0, 2]]
