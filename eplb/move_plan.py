"""Minimal expert-move plans: which rank sends which expert where (pure, CPU, no processes).

Conventions: a placement ``phy2log`` is ``[R]`` (one layer) or ``[L, R]`` int, the logical expert
of every physical slot, ``-1`` for an unused slot; slot ``p`` lives on rank ``p // S`` at local
slot ``p % S`` with ``S = R / num_ranks``. Every slot number in a :class:`MovePlan` is a *local*
slot index in ``[0, S)`` of the rank it is listed under (or of the rank it names).

A plan moves the fewest bytes possible: a rank receives each logical expert it lacks exactly
once (into one slot) and fills every other slot that needs it by a local copy; an expert the
rank already holds is copied locally, never received. See docs/moves.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from eplb.checks import int_tensor, positive_int
from eplb.maps import as_layers

__all__ = ["MovePlan", "min_move_bytes", "plan_moves"]

Slots = tuple[int, ...]


@dataclass(frozen=True)
class MovePlan:
    """How one layer's expert weights move from an old placement to a new one.

    Every per-rank field is a tuple with one entry per rank; slot numbers are local slots.

    Attributes:
        layer: layer index (0 for a one-layer plan); used in messages.
        num_ranks: ranks of the expert-parallel group.
        slots_per_rank: S, local slots per rank.
        old: the old placement, ``R = num_ranks * S`` logical ids (-1 unused).
        new: the new placement, same length.
        keep: per rank, local slots whose expert is unchanged (``old == new != -1``): untouched.
        copies: per rank, ``(src_slot, dst_slot)`` local copies of expert ``e`` (the new
            expert of ``dst_slot``), sorted by ``dst_slot``. If ``src_slot`` held ``e`` in the
            old placement, its *old* content is copied (even if the same move overwrites
            ``src_slot``); otherwise ``src_slot`` is the ``dst_slot`` of this rank's receive of
            ``e`` and the received content is copied. (A rank that held ``e`` never receives
            it, so the rule is unambiguous; one slot can be the source of both kinds.)
        recvs: per rank, ``(src_rank, src_slot, dst_slot)``: receive the old content of
            ``src_slot`` on ``src_rank`` into ``dst_slot``; sorted by ``dst_slot``.
        sends: per rank, ``(dst_rank, src_slot)``: send the old content of ``src_slot``; sorted
            by ``dst_rank``, and between one pair of ranks in the receiver's ``recvs`` order.

    Slots listed in none of ``keep``, ``copies[.][1]`` and ``recvs[.][2]`` are unused in the new
    placement (``new == -1``) and are left as they are.
    """

    layer: int
    num_ranks: int
    slots_per_rank: int
    old: Slots
    new: Slots
    keep: tuple[Slots, ...]
    copies: tuple[tuple[tuple[int, int], ...], ...]
    recvs: tuple[tuple[tuple[int, int, int], ...], ...]
    sends: tuple[tuple[tuple[int, int], ...], ...]

    @property
    def num_transfers(self) -> int:
        """Experts sent between ranks (each one expert's worth of bytes)."""
        return sum(len(r) for r in self.recvs)

    @property
    def is_noop(self) -> bool:
        """True when no slot needs new content (no receive and no local copy on any rank)."""
        return self.num_transfers == 0 and not any(self.copies)

    def bytes(self, expert_bytes: int) -> int:
        """Bytes sent between ranks when one expert's weights take ``expert_bytes`` bytes."""
        return self.num_transfers * positive_int("expert_bytes", expert_bytes)


def checked_placements(
    old_phy2log: object, new_phy2log: object, num_ranks: object
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Validated placements as CPU int64 ``[L, R]``: (old, new, num_ranks, slots_per_rank).

    Raises ``TypeError``/``ValueError`` naming the bad argument (see :func:`plan_moves`).
    """
    layers = []
    for name, value in (("old_phy2log", old_phy2log), ("new_phy2log", new_phy2log)):
        p = int_tensor(name, value, convert=True)
        try:
            layers.append(as_layers(p))
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
    old, new = layers
    if torch.as_tensor(old_phy2log).shape != torch.as_tensor(new_phy2log).shape:
        raise ValueError(
            f"old_phy2log {tuple(torch.as_tensor(old_phy2log).shape)} and new_phy2log "
            f"{tuple(torch.as_tensor(new_phy2log).shape)} must have the same shape"
        )
    ranks = positive_int("num_ranks", num_ranks)
    num_slots = old.shape[1]
    if num_slots == 0 or num_slots % ranks:
        raise ValueError(
            f"the {num_slots} physical slots are not split evenly over num_ranks={ranks}"
        )
    return old, new, ranks, num_slots // ranks


def _missing_expert(layer: int, old: list[int], new: list[int]) -> None:
    """``ValueError`` naming the first expert of ``new`` held by no slot of ``old``."""
    present = set(old)
    for slot, expert in enumerate(new):
        if expert >= 0 and expert not in present:
            raise ValueError(
                f"layer {layer}: expert {expert} (new slot {slot}) is held by no slot of the "
                "old placement, so no rank can send it"
            )


def _local_source(expert: int, old: list[int], new: list[int]) -> int:
    """Local slot to copy ``expert`` from: one that keeps it, else an unused one, else any.

    A kept or unused slot is not overwritten, so the mover reads it in place at commit; an
    overwritten source costs a staging copy.
    """
    holding = [s for s, e in enumerate(old) if e == expert]
    kept = [s for s in holding if new[s] == expert]
    unused = [s for s in holding if new[s] < 0]
    return (kept or unused or holding)[0]


def _plan_layer(
    layer: int, old: list[int], new: list[int], num_ranks: int, slots: int, per_node: int | None
) -> MovePlan:
    """The plan of one layer (``old``/``new``: R Python ints)."""
    _missing_expert(layer, old, new)
    # First old local slot of each (rank, expert), and the ranks holding each expert.
    holder_slot: dict[tuple[int, int], int] = {}
    for p, e in enumerate(old):
        if e >= 0:
            holder_slot.setdefault((p // slots, e), p % slots)
    holders: dict[int, list[int]] = {}
    for r, e in holder_slot:
        holders.setdefault(e, []).append(r)

    keep, copies = [], []
    # Receives to make: (receiving rank, expert, its slots to fill), in rank then slot order.
    wanted: list[tuple[int, int, list[int]]] = []
    for r in range(num_ranks):
        o, n = old[r * slots : (r + 1) * slots], new[r * slots : (r + 1) * slots]
        keep.append(tuple(s for s in range(slots) if n[s] >= 0 and n[s] == o[s]))
        need: dict[int, list[int]] = {}  # expert -> slots to fill, in slot order
        for s in range(slots):
            if n[s] >= 0 and n[s] != o[s]:
                need.setdefault(n[s], []).append(s)
        rank_copies = []
        for e, dsts in need.items():
            if (r, e) in holder_slot:
                src = _local_source(e, o, n)
                rank_copies += [(src, d) for d in dsts]
            else:
                wanted.append((r, e, dsts))
                rank_copies += [(dsts[0], d) for d in dsts[1:]]
        copies.append(tuple(sorted(rank_copies, key=lambda c: c[1])))

    def candidates(r: int, e: int) -> list[int]:
        """Holders that may send ``e`` to ``r``: those on r's node if any, else all; nearest
        rank above r first (so equal holders take turns)."""
        near = [h for h in holders[e] if per_node is None or h // per_node == r // per_node]
        return sorted(near or holders[e], key=lambda h: (h - r) % num_ranks)

    options = [candidates(r, e) for r, e, _ in wanted]
    source = _balanced_senders(options, num_ranks)
    recvs: list[list[tuple[int, int, int]]] = [[] for _ in range(num_ranks)]
    sends: list[list[tuple[int, int]]] = [[] for _ in range(num_ranks)]
    for (r, e, dsts), src_rank in zip(wanted, source, strict=True):
        src_slot = holder_slot[src_rank, e]
        recvs[r].append((src_rank, src_slot, dsts[0]))
        sends[src_rank].append((r, src_slot))
    return MovePlan(
        layer=layer,
        num_ranks=num_ranks,
        slots_per_rank=slots,
        old=tuple(old),
        new=tuple(new),
        keep=tuple(keep),
        copies=tuple(copies),
        recvs=tuple(tuple(r) for r in recvs),
        sends=tuple(tuple(s) for s in sends),
    )


def _balanced_senders(options: list[list[int]], num_ranks: int) -> list[int]:
    """A sender for every receive, from its ``options`` (ranks, preferred first), such that the
    most sends of any rank is as small as possible: that rank's link time bounds the move.

    Receives with fewer options choose first, each the option that sends least so far; then,
    while some most-loaded rank can hand one send down a chain of reassignments to a rank with
    at least two sends fewer, the chain is applied (breadth first). With no such chain left the
    largest load is minimal (unit jobs with restricted assignment: an assignment without a
    load-reducing path is optimal). Deterministic: every rank computes the same senders.
    """
    load = [0] * num_ranks
    source = [-1] * len(options)
    for i in sorted(range(len(options)), key=lambda i: (len(options[i]), i)):
        source[i] = min(options[i], key=lambda h: load[h])
        load[source[i]] += 1
    while True:
        path = _relief_path(options, source, load)
        if path is None:
            return source
        load[source[path[0][0]]] -= 1
        load[path[-1][1]] += 1
        for i, h in path:
            source[i] = h


def _relief_path(
    options: list[list[int]], source: list[int], load: list[int]
) -> list[tuple[int, int]] | None:
    """Reassignments ``(receive, new sender)`` that take one send off a most-loaded rank and
    give one to a rank with at least two sends fewer, every rank between keeping its load; None
    if there is none (breadth first, in rank and receive order)."""
    top = max(load, default=0)
    by_source: list[list[int]] = [[] for _ in load]
    for i, h in enumerate(source):
        by_source[h].append(i)
    came: dict[int, tuple[int, int] | None] = {h: None for h, n in enumerate(load) if n == top}
    queue = list(came)
    for u in queue:
        for i in by_source[u]:
            for v in options[i]:
                if v in came:
                    continue
                came[v] = (i, u)
                if load[v] <= top - 2:
                    path = []
                    while came[v] is not None:
                        i, u = came[v]
                        path.append((i, v))
                        v = u
                    return path[::-1]
                queue.append(v)
    return None


def plan_moves(
    old_phy2log: torch.Tensor,
    new_phy2log: torch.Tensor,
    num_ranks: int,
    ranks_per_node: int | None = None,
) -> MovePlan | list[MovePlan]:
    """Plan the expert-weight moves from ``old_phy2log`` to ``new_phy2log``.

    Every rank computes the same plan from the same placements (the choice of senders is
    deterministic), so no plan is exchanged.

    Args:
        old_phy2log: [R] or [L, R] integer (list, numpy array or tensor), the placement the
            weights are in now, -1 for unused slots.
        new_phy2log: the target placement, same shape; -1 marks a slot that will be unused.
        num_ranks: ranks of the expert-parallel group; must divide R.
        ranks_per_node: ranks per node (rank ``r`` is on node ``r // ranks_per_node``); when
            given, an expert is sent from the receiver's own node whenever a rank there holds it.

    Returns:
        One :class:`MovePlan` for [R] inputs, a list of L plans (``plan.layer`` = index) for
        [L, R] inputs. ``plan.bytes(b)`` equals ``min_move_bytes(old, new, num_ranks, b)``.

    Raises:
        TypeError: non-integer placements or counts.
        ValueError: shapes differ, R not a multiple of ``num_ranks``, ids below -1, or an expert
            of the new placement held by no slot of the old one (the message names the layer
            and the expert).
    """
    old, new, ranks, slots = checked_placements(old_phy2log, new_phy2log, num_ranks)
    per_node = None if ranks_per_node is None else positive_int("ranks_per_node", ranks_per_node)
    plans = [
        _plan_layer(layer, o, n, ranks, slots, per_node)
        for layer, (o, n) in enumerate(zip(old.tolist(), new.tolist(), strict=True))
    ]
    return plans[0] if torch.as_tensor(old_phy2log).dim() == 1 else plans


def _presence(p: torch.Tensor, num_ranks: int, num_logical: int) -> torch.Tensor:
    """[L, num_ranks, num_logical] bool: rank holds the expert in ``p`` ([L, R] int64)."""
    num_layers = p.shape[0]
    grid = torch.zeros(num_layers, num_ranks, num_logical + 1, dtype=torch.bool)
    # Column 0 collects the unused slots (-1 + 1) and is dropped.
    grid.scatter_(2, (p + 1).reshape(num_layers, num_ranks, -1), True)
    return grid[:, :, 1:]


def min_move_bytes(
    old_phy2log: torch.Tensor, new_phy2log: torch.Tensor, num_ranks: int, expert_bytes: int
) -> int:
    """Lower bound of the bytes any move from ``old_phy2log`` to ``new_phy2log`` must send.

    Every rank must obtain, from another rank, each logical expert that some of its slots hold
    in the new placement and none of its slots holds in the old one: the bound is the number of
    such (rank, expert) pairs, summed over ranks (and layers), times ``expert_bytes``.

    Args:
        old_phy2log: [R] or [L, R] integer, -1 for unused slots.
        new_phy2log: same shape.
        num_ranks: ranks; must divide R.
        expert_bytes: bytes of one expert's weights (all weight kinds together), >= 1.

    Returns:
        The bound in bytes (a Python int), summed over all layers.

    Raises:
        The same errors as :func:`plan_moves` for the placements.
    """
    old, new, ranks, _ = checked_placements(old_phy2log, new_phy2log, num_ranks)
    size = positive_int("expert_bytes", expert_bytes)
    num_logical = int(max(old.max(), new.max())) + 1
    have, want = _presence(old, ranks, num_logical), _presence(new, ranks, num_logical)
    absent = (want.any(1) & ~have.any(1)).any(1)
    if absent.any():
        layer = int(absent.nonzero()[0])
        _missing_expert(layer, old[layer].tolist(), new[layer].tolist())
    return int((want & ~have).sum()) * size
