"""Global norms of sharded gradients: DTensors, ``process_group=`` and (tensors, group) pairs.

Every norm the clip pipeline (``gradclip.pipeline.measure``) takes goes through
:func:`reduced_stats` when a gradient is a DTensor or a ``process_group`` is given; plain
single-process calls never reach this module (:func:`involved` is their only cost).

How a norm is reduced (the design, in ``docs/distributed.md``):

1. Each gradient gets a *chain*: the set of process groups its p-th power sum must be
   summed over. A DTensor contributes the group of each mesh dimension whose placement
   shards it (``Shard``, ``_StridedShard``, whatever else torch reports as a shard);
   ``Replicate`` dimensions hold copies and are not reduced, so they count once;
   ``Partial`` and placements gradclip does not know are refused. Mesh dimensions of
   size 1 are skipped (nothing to sum). ``process_group=`` adds its group to every
   chain; a (tensors, group) pair adds its group to the chains of its tensors. A group
   that shares more than this rank with another group of the same chain would count
   gradients twice: refused.
2. The tensors of one chain are measured together by the backend, on their local shards,
   in one read: a *row* ``[sum |g|^p (max |g| for inf), NaN flag, inf/NaN flag]`` in
   float64.
3. The groups are reduced one after the other, each in one all-reduce (SUM, MAX for the
   inf norm): a functional collective when ``torch.compile`` traces it, the c10d op
   eagerly; neither reads the host. The all-reduce of a group carries one row for the
   rows that have no group left after it (their sum), then one row per distinct set of
   groups still to come (the rows with that set summed). A row is thus summed over
   every group of its chain exactly once, whatever order the groups come in; sums (and
   maxima) over different groups commute, so the order does not change the result.
4. The rows left are combined on the device, the root taken, and the clip coefficient
   computed there; each rank then scales its own local shards.

Why no two ranks wait on each other crosswise, and why the members of a group agree on
the shape of its all-reduce (both hold for any number of meshes, of groups reachable
through several meshes, and whatever the groups' names):

- Every group has a *key* computed from the group alone, the same on each of its
  members. A mesh dimension's key is its *axis*: the partition of the ranks into the
  groups along that dimension, read from the mesh's layout, so a group reached as
  dimension 1 of a 2-D mesh and as dimension 0 of its submesh has one key. A group
  passed as ``process_group`` has its name as key (the same on all its members). The
  axes come before the ``process_group`` groups; two groups with the same axis (two
  meshes built alike) are ordered by name.
- Each rank reduces its groups in increasing key order. Then no cycle of waits can form:
  of the all-reduces not yet done, the one of smallest key has every member either
  already in it or still before it with nothing else to wait for (all its earlier
  all-reduces have smaller keys, so they are done).
- A group's rows are laid out by the keys of the groups still to come (a
  ``process_group`` group there by its position in the argument). The members of a
  mesh dimension hold the same DTensors (every rank of a mesh holds a shard of each),
  so they have the same chains, have reduced the same axes before, and lay out the
  same rows. The groups passed as ``process_group`` come last, when every row has
  nothing else to wait for: their all-reduce is one row on every member, whatever
  each holds (pipeline stages hold different layers).

NaN is carried as a flag because a MAX all-reduce need not propagate it.

A spike guard that watches the loss gets the mean of the ranks' losses from the same
all-reduces: two more columns (the loss, and 1 for a rank that has one) in the row of one
chain whose groups reach every rank. Where no chain does (HSDP's replicas hold copies of
the gradients, so the norm never crosses them), the loss gets one all-reduce of its own
over the default group.

With ``GRADCLIP_CHECK_RANKS=1`` in the environment, each plan is checked in one extra
all-reduce over the default process group: every rank of a mesh must have passed the same
DTensors (count, global shapes, placements), and every member of a group must lay out its
all-reduce alike. If not, every rank raises (also when a rank failed to plan). Off by
default: it costs a collective and a host read per call.

The plan is host bookkeeping over Python objects (meshes, groups, caches keyed by
identity): under ``torch.compile`` it runs eagerly (one graph break, which
``fullgraph=True`` refuses with gradclip's own message), and the reduction after it is
traced.
"""

from __future__ import annotations

import hashlib
import math
import operator
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat

import torch
from torch import Tensor

from .backends import dispatch
from .eager import run_eagerly
from .backends.base import NORM, clip_coefficient

CHECK_RANKS_ENV = "GRADCLIP_CHECK_RANKS"
_DTENSOR_MODULE = "torch.distributed.tensor"
_spec_of = operator.attrgetter("_spec")
_grad_of = operator.attrgetter("grad")
_first, _second = operator.itemgetter(0), operator.itemgetter(1)
# A DTensor's local tensor itself: what to_local() returns under no_grad, without its
# Python call per tensor (and not the view it makes under autograd).
_local_of = operator.attrgetter("_local_tensor")
_VALUE, _NAN, _NONFINITE = 0, 1, 2  # the columns of a row


def _dtensor_class():
    """DTensor's class if its module is loaded; no DTensor can exist before that."""
    module = sys.modules.get(_DTENSOR_MODULE)
    return None if module is None else module.DTensor


def _may_hold_dtensors() -> bool:
    """Whether a DTensor can exist: its module is loaded (importing torch alone does not,
    but much of torch does) and a process group is initialized (a DeviceMesh needs one)."""
    return (_DTENSOR_MODULE in sys.modules and torch.distributed.is_available()
            and torch.distributed.is_initialized())


def has_dtensor(tensors: Sequence[Tensor]) -> bool:
    """Whether any of ``tensors`` is a DTensor: a couple of cheap checks in a single
    process, one C-level pass over the types once a process group exists."""
    if not _may_hold_dtensors():
        return False
    dtensor = _dtensor_class()
    return any(issubclass(kind, dtensor) for kind in set(map(type, tensors)))


def grads_and_silent(parameters: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    """The ``.grad`` of ``parameters`` that have one, and the parameters without one
    (C-level maps when every parameter has one, the common case)."""
    if torch.compiler.is_compiling():
        # Plain Python that Dynamo traces (it cannot call an attrgetter): the plan after
        # it then raises gradclip's own error under fullgraph=True.
        grads = [p.grad for p in parameters]
        return ([g for g in grads if g is not None],
                [p for p, g in zip(parameters, grads) if g is None])
    grads = list(map(_grad_of, parameters))
    if not any(map(operator.is_, grads, repeat(None))):
        return grads, []
    return ([g for g in grads if g is not None],
            [p for p, g in zip(parameters, grads) if g is None])


def involved(tensors: Sequence[Tensor], process_group) -> bool:
    """Whether a norm of ``tensors`` must go through this module."""
    return process_group is not None or has_dtensor(tensors)


# -- the groups a row is summed over ----------------------------------------------------


def _name_key(name: str) -> tuple:
    # Names are numbers in creation order, or hashes (split_group): any order of them
    # that every member sees alike will do; numbers compare as numbers (creation order).
    return (0, int(name), "") if name.isdigit() else (1, 0, name)


@dataclass(frozen=True, eq=False)
class _Group:
    """One process group rows are summed over (at least 2 ranks).

    ``axis``: for a mesh dimension, the partition of the mesh's ranks into the groups
    along it (sorted tuples of global ranks), the same on every rank of the mesh however
    the dimension was reached; ``None`` for a group passed as ``process_group``.
    Two ``_Group`` are equal when they name the same process group (names are unique
    among the live groups of a rank).
    """

    name: str
    process_group: object  # the ProcessGroup itself (eager all-reduce)
    handle: object  # what functional collectives take: a ProcessGroup or (mesh, dim)
    device: torch.device
    members: frozenset
    axis: tuple | None

    @property
    def order(self) -> tuple:
        """The key every member of this group sorts it by (module docstring)."""
        if self.axis is not None:
            return (0, self.axis, _name_key(self.name))
        return (1, (), _name_key(self.name))

    def describe(self) -> str:
        kind = f"mesh axis {list(map(list, self.axis))}" if self.axis else "process group"
        return f"{kind} (group {self.name!r}, ranks {sorted(self.members)})"

    def __hash__(self) -> int:
        return hash(self.name)

    def __eq__(self, other) -> bool:
        return isinstance(other, _Group) and other.name == self.name


def _device_of_mesh(mesh) -> torch.device:
    if mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(mesh.device_type)


def _device_of_group(group) -> torch.device:
    backend = str(torch.distributed.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_plain_groups: dict[str, _Group] = {}


def _process_group(group, what: str) -> _Group | None:
    """``group`` as a ``process_group`` argument names it; ``None`` for a group of one
    rank (a sum over it changes nothing)."""
    dist = torch.distributed
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        # What new_group() returns on the ranks it leaves out.
        raise ValueError(f"{what} does not contain this rank ({dist.get_rank()}); pass, on each "
                         "rank, a group that the rank belongs to")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{what} must be a torch.distributed.ProcessGroup (for a DeviceMesh "
                        f"dimension, pass mesh.get_group(dim)), got {type(group).__name__}")
    cached = _plain_groups.get(group.group_name)
    if cached is not None and cached.process_group is group:
        return cached
    if dist.get_rank(group) < 0:
        raise ValueError(f"{what} does not contain this rank ({dist.get_rank()}); pass, on each "
                         "rank, a group that the rank belongs to")
    if group.size() == 1:
        return None
    described = _Group(group.group_name, group, group, _device_of_group(group),
                       frozenset(dist.get_process_group_ranks(group)), None)
    _plain_groups[group.group_name] = described
    return described


def _mesh_axis(mesh, dim: int) -> tuple[tuple[int, ...], ...]:
    """The groups along mesh dimension ``dim``, as sorted tuples of global ranks: from the
    mesh's layout over its root's ranks (a submesh knows its root's), else, on a torch
    without layouts, from the mesh's own ranks."""
    size = mesh.size(dim)
    try:
        from torch.distributed._mesh_layout import _MeshLayout

        blocks = _MeshLayout([mesh._layout[dim]]).remap_to_tensor(mesh._rank_map)
    except (ImportError, AttributeError, IndexError, TypeError):
        blocks = mesh.mesh.movedim(dim, -1)
    return tuple(sorted(tuple(sorted(block)) for block in blocks.reshape(-1, size).tolist()))


def _mesh_group(mesh, dim: int) -> _Group | None:
    """Mesh dimension ``dim`` as a group to sum over; ``None`` when it has one rank."""
    if mesh.size(dim) == 1:
        return None
    dist = torch.distributed
    group = mesh.get_group(dim)
    members = frozenset(dist.get_process_group_ranks(group))
    axis = _mesh_axis(mesh, dim)
    if members not in map(frozenset, axis):
        raise RuntimeError(f"gradclip could not read the layout of mesh dimension {dim} of {mesh}: "
                           f"its group holds ranks {sorted(members)}, which is none of the groups "
                           f"{axis} its layout gives. Please report this with your torch version.")
    return _Group(group.group_name, group, (mesh, dim), _device_of_mesh(mesh), members, axis)


def _shard_classes() -> tuple[type, ...]:
    """The placement classes that shard a tensor, as far as this torch has them: ``Shard``,
    ``_StridedShard`` (FSDP2 over tensor parallelism; not a ``Shard`` in torch 2.14, and
    its ``is_shard()`` is False) and their C++ bases."""
    from torch.distributed.tensor import placement_types

    native = getattr(torch._C, "_distributed", None)
    candidates = (getattr(placement_types, "Shard", None),
                  getattr(placement_types, "_StridedShard", None),
                  getattr(native, "Shard", None), getattr(native, "StridedShard", None))
    return tuple(c for c in candidates if isinstance(c, type))


def _shards(placement, dim: int, placements) -> bool:
    """Whether ``placement`` splits the tensor over mesh dimension ``dim`` (its rows are
    summed over that dimension's group): True for every kind of shard, False for a
    replica; a partial sum, or a placement gradclip does not know, raises."""
    if placement.is_partial():
        raise ValueError(f"a gradient is a DTensor with a Partial placement on mesh dimension "
                         f"{dim} ({placements}): its local values are unreduced summands, "
                         "not a part of the gradient, so its norm is undefined. Reduce it "
                         "first, e.g. grad.redistribute(placements=[Replicate()] * mesh.ndim), "
                         "as FSDP and DDP do before clipping.")
    if placement.is_shard() or isinstance(placement, _shard_classes()):
        return True
    if placement.is_replicate():
        return False
    raise ValueError(f"a gradient is a DTensor with placement {placement!r} on mesh dimension "
                     f"{dim} ({placements}), which gradclip does not know: it is neither a "
                     "shard (Shard, _StridedShard), a replica (Replicate) nor a partial sum, so "
                     "gradclip cannot tell whether to sum its norm over that dimension. "
                     "Redistribute the gradient to Shard or Replicate placements first, or "
                     "pass its local tensors with process_group= (docs/distributed.md).")


def _mesh_chain(mesh, placements) -> tuple[_Group, ...]:
    if mesh.get_coordinate() is None:
        raise ValueError(f"a gradient is a DTensor on {mesh}, which does not contain this rank "
                         f"({torch.distributed.get_rank()}); its norm can only be taken on the "
                         "mesh's ranks. Pass each rank only the gradients it holds a shard of.")
    groups = [_mesh_group(mesh, dim) for dim, placement in enumerate(placements)
              if _shards(placement, dim, placements)]
    return _canonical([g for g in groups if g is not None])


def _canonical(groups: Iterable[_Group]) -> tuple[_Group, ...]:
    """A chain as a tuple in key order: equal chains are equal tuples."""
    return tuple(sorted(groups, key=operator.attrgetter("order")))


class _MeshLayouts:
    """The chain of a DTensor, per (mesh, placements), computed once.

    Looked up first by the identity of the DTensor's spec (FSDP2 gives a parameter's
    gradient the same spec object every step): hashing placements costs a Python call
    per tensor, which thousands of gradients notice.
    """

    _MAX_SPECS = 1 << 16

    def __init__(self):
        self._by_layout: dict[tuple, tuple] = {}
        self._by_spec: dict[int, tuple] = {}

    def chains(self, specs: list) -> list[tuple[_Group, ...]]:
        """``chain`` of each spec; when every spec was seen before (every step after the
        first), without a Python call per tensor."""
        hits = list(map(self._by_spec.get, map(id, specs)))
        if None not in hits and all(map(operator.is_, map(_first, hits), specs)):
            return list(map(_second, hits))
        return list(map(self.chain, specs))

    def chain(self, spec) -> tuple[_Group, ...]:
        hit = self._by_spec.get(id(spec))
        if hit is not None and hit[0] is spec:
            return hit[1]
        mesh, placements = spec.mesh, spec.placements
        key = (id(mesh), placements)
        layout = self._by_layout.get(key)
        if layout is None or layout[0] is not mesh:
            layout = self._by_layout[key] = (mesh, _mesh_chain(mesh, placements))
        if len(self._by_spec) >= self._MAX_SPECS:
            self._by_spec.clear()
        self._by_spec[id(spec)] = (spec, layout[1])
        return layout[1]


_layouts = _MeshLayouts()


# -- which tensors go where -----------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    """One all-reduce, over ``group``, of one row per entry of ``slots``: ``slots[0]`` is
    empty (the rows with no group left after this one, summed), each other one a set of
    groups still to come (the rows that go on to exactly those, summed). ``layout``: the
    slots as every member of the group sees them (the keys of their groups)."""

    group: _Group
    slots: tuple[frozenset, ...]
    layout: tuple


@dataclass
class Plan:
    """The tensors of one call, by chain, as local (plain) tensors, and the reductions.

    ``chains`` maps a chain to the local tensors measured together; a chain may hold no
    tensor (a rank whose parameters have no gradient there still joins the reduction).
    ``locals`` is every local tensor, in input order (what a clip scales). ``mesh`` is the
    first DTensor's mesh (where a DTensor result lives), or ``None``. ``schedule``: the
    all-reduces, in the order every rank issues them.
    """

    chains: dict[tuple[_Group, ...], list[Tensor]]
    locals: list[Tensor]
    mesh: object = None
    schedule: tuple[_Step, ...] = ()


def _schedule(chains: Iterable[tuple[_Group, ...]], tail_positions: dict) -> tuple[_Step, ...]:
    """The all-reduces that sum every chain's row over each of its groups exactly once,
    in key order (see the module docstring for why every member agrees on them)."""
    groups = {g for chain in chains for g in chain}
    shared_axes = {g.axis for g in groups if g.axis is not None and
                   sum(other.axis == g.axis for other in groups) > 1}

    def slot_key(group: _Group) -> tuple:
        # Not the name: the members of a group reach different groups after it (dp 0 of
        # tp 0, dp 1 of tp 1...), whose names differ. Only two groups with one axis need
        # it (two meshes built alike): their names then order them.
        if group.axis is None:
            return (1, (), (tail_positions.get(group, -1), 0, ""))
        return (0, group.axis, _name_key(group.name) if group.axis in shared_axes else ())

    def layout_key(rest: frozenset) -> list:
        return sorted(map(slot_key, rest))

    pending = {frozenset(chain) for chain in chains if chain}
    steps = []
    for group in _canonical({g for chain in pending for g in chain}):
        members = {chain for chain in pending if group in chain}
        rests = {chain - {group} for chain in members} - {frozenset()}
        going_on = sorted(rests, key=layout_key)
        pending = (pending - members) | rests
        steps.append(_Step(group, (frozenset(),) + tuple(going_on),
                           tuple(tuple(layout_key(rest)) for rest in going_on)))
    return tuple(steps)


def _pair_groups(pairs) -> tuple[dict[int, object], list[_Group]]:
    """From (tensors, group) pairs: the group of each listed tensor (by id; a parameter's
    ``.grad`` too, so that pairs of parameters also sort their gradients) and the groups,
    in the order the pairs name them."""
    where: dict[int, object] = {}
    groups: list[_Group] = []
    for index, pair in enumerate(pairs):
        try:
            tensors, group = pair
        except (TypeError, ValueError):
            raise TypeError(f"process_group[{index}] must be a (tensors, group) pair, got "
                            f"{type(pair).__name__}; see docs/distributed.md") from None
        described = None if group is None else _process_group(group, f"process_group[{index}][1]")
        if described is not None and described not in groups:
            groups.append(described)
        for t in ([tensors] if isinstance(tensors, Tensor) else tensors):
            if id(t) in where:
                raise ValueError(f"a tensor appears in process_group[{index}] and in an earlier "
                                 "pair; list each parameter in exactly one pair")
            where[id(t)] = described
            if t.grad is not None:
                where[id(t.grad)] = described
    return where, groups


def _tails(items: Sequence[Tensor], process_group) -> tuple[list, list[_Group]]:
    """Per item, the group ``process_group`` adds to its chain (or None), and every group
    this rank must join even without a tensor in it, in the argument's order."""
    if process_group is None:
        return [None] * len(items), []
    if not isinstance(process_group, (list, tuple)):
        tail = _process_group(process_group, "process_group")
        return [tail] * len(items), [] if tail is None else [tail]
    where, groups = _pair_groups(process_group)
    missing = sum(id(t) not in where for t in items)
    if missing:
        raise ValueError(f"{missing} of the {len(items)} tensors or parameters passed are in no "
                         "(tensors, group) pair of process_group; list every one of them (group "
                         "None for those that need no reduction)")
    return [where[id(t)] for t in items], groups


def _with_tail(chain: tuple[_Group, ...], tail: _Group) -> tuple[_Group, ...]:
    for group in chain:
        shared = group.members & tail.members
        if len(shared) > 1:
            raise ValueError(
                f"process_group {tail.name!r} is also a mesh dimension that shards a DTensor "
                f"gradient, or shares ranks {sorted(shared)} with one ({group.describe()}): "
                "DTensors are already reduced over their meshes, and reducing again would "
                "count them several times. Pass process_group only for what the meshes do not "
                "cover (pipeline stages, plain shards).")
    return _canonical(chain + (tail,))


def plan(tensors: Sequence[Tensor], process_group=None, *,
         silent_owners: Sequence[Tensor] = ()) -> Plan:
    """Sort ``tensors`` into chains and schedule their reductions.

    ``silent_owners``: parameters without a gradient on this rank; the reductions of
    their chains are still joined, so that ranks whose gradients are missing do not
    leave the others waiting. Host bookkeeping: under ``torch.compile`` it runs eagerly
    (a graph break; ``fullgraph=True`` raises gradclip's message).
    """
    if torch.compiler.is_compiling():
        _break_graph_before_planning()
    return _plan_eagerly(tensors, process_group, silent_owners)


@run_eagerly
def _plan_eagerly(tensors: Sequence[Tensor], process_group, silent_owners) -> Plan:
    tensors = tensors if isinstance(tensors, list) else list(tensors)
    if not checks_ranks():
        return _plan(tensors, process_group, silent_owners)
    try:
        planned = _plan(tensors, process_group, silent_owners)
    except (ValueError, TypeError, RuntimeError):
        _check_ranks(None, tensors, silent_owners, failed=True)
        raise
    _check_ranks(planned, tensors, silent_owners, failed=False)
    return planned


def _plan(tensors: list[Tensor], process_group, silent_owners: Sequence[Tensor]) -> Plan:
    tails, joined = _tails(tensors + list(silent_owners), process_group)
    local_tensors, per_tensor, mesh = _mesh_chains(tensors)
    silent_chains, silent_mesh = _silent_chains(silent_owners)
    if process_group is not None:
        # A group passed here that is also a mesh axis of some gradient is that axis.
        axes = {g: g for chain in set(per_tensor + silent_chains) for g in chain}
        tails = [None if tail is None else axes.get(tail, tail) for tail in tails]
        joined = [axes.get(group, group) for group in joined]
        per_tensor = [chain if tail is None else _with_tail(chain, tail)
                      for chain, tail in zip(per_tensor, tails)]
        silent_chains = [chain if tail is None else _with_tail(chain, tail)
                         for chain, tail in zip(silent_chains, tails[len(tensors):])]
    chains: dict[tuple[_Group, ...], list[Tensor]] = {}
    first = per_tensor[0] if per_tensor else None
    if first is not None and per_tensor.count(first) == len(per_tensor):
        chains[first] = local_tensors  # one chain: the common case
    else:
        for chain, t in zip(per_tensor, local_tensors):
            chains.setdefault(chain, []).append(t)
    for chain in silent_chains:
        if chain:
            chains.setdefault(chain, [])
    for group in joined:
        if not any(group in chain for chain in chains):
            chains[(group,)] = []
    positions = {group: index for index, group in enumerate(joined)}
    return Plan(chains, local_tensors, silent_mesh if mesh is None else mesh,
                _schedule(chains, positions))


def _mesh_chains(tensors: list[Tensor]) -> tuple[list[Tensor], list[tuple], object]:
    """The local tensor and the mesh chain of each tensor, and the first DTensor's mesh."""
    dtensor = _dtensor_class()
    if dtensor is not None and tensors and all(map(isinstance, tensors, repeat(dtensor))):
        # Only DTensors (FSDP2): the per-tensor work in C-level maps.
        specs = list(map(_spec_of, tensors))
        return list(map(_local_of, tensors)), _layouts.chains(specs), specs[0].mesh
    local_tensors, per_tensor, mesh = [], [], None
    for t in tensors:
        if dtensor is not None and isinstance(t, dtensor):
            spec = t._spec
            per_tensor.append(_layouts.chain(spec))
            mesh = spec.mesh if mesh is None else mesh
            t = _local_of(t)
        else:
            per_tensor.append(())
        local_tensors.append(t)
    return local_tensors, per_tensor, mesh


def _silent_chains(owners: Sequence[Tensor]) -> tuple[list[tuple], object]:
    """The mesh chain of each parameter without a gradient, and the first one's mesh."""
    dtensor = _dtensor_class()
    chains, mesh = [], None
    for owner in owners:
        chain = ()
        if dtensor is not None and isinstance(owner, dtensor):
            chain = _layouts.chain(owner._spec)
            mesh = owner._spec.mesh if mesh is None else mesh
        chains.append(chain)
    return chains, mesh


# -- the reduction --------------------------------------------------------------------


def _row(tensors: list[Tensor], norm_type: float, inv_scale: Tensor | None, backend: str,
         device: torch.device, width: int) -> tuple[Tensor, torch.dtype]:
    """``[sum |g|^p (or max |g|), NaN flag, inf/NaN flag]`` in float64 for these tensors
    (then zeros up to ``width`` columns), and the dtype of their ``stats`` (float64 if any
    tensor is float64)."""
    if not tensors:
        return torch.zeros(width, dtype=torch.float64, device=device), torch.float32
    stats = dispatch.norm_stats(tensors, norm_type, math.inf, inv_scale, backend)
    dtype = stats.dtype
    stats = stats.to(torch.float64)
    norm = stats[NORM]
    is_nan = norm.isnan()
    value = torch.where(is_nan, 0.0, norm)
    if not math.isinf(norm_type):
        value = value.pow(norm_type)
    columns = [value, is_nan.to(torch.float64), stats[2]] + [norm.new_zeros(())] * (width - 3)
    return torch.stack(columns).to(device), dtype


def _loss_chain(p: Plan) -> tuple[_Group, ...] | None:
    """The chain whose row carries this rank's loss: one whose groups together reach every
    rank (their sizes multiply to the world's), so that its sum is the whole job's; the
    same choice on every rank of a layout (by the groups' keys). ``None``: no chain
    reaches every rank (HSDP's replicas, say), and the loss needs an all-reduce of its own."""
    world = torch.distributed.get_world_size()
    covering = [chain for chain in p.chains
                if chain and math.prod(len(g.members) for g in chain) == world]
    if not covering:
        return None
    return min(covering, key=lambda chain: (-len(chain), [g.order for g in _canonical(chain)]))


def _all_reduce(rows: Tensor, group: _Group, inf_norm: bool) -> Tensor:
    """``rows`` summed (maxed) over ``group``. Traced: a functional collective. Eager: the
    in-place c10d op on the fresh ``rows``, which skips the functional wrapper's Python
    work (0.3 ms a call on gloo). Neither reads the host; with NCCL both are ordered on
    the stream."""
    dist = torch.distributed
    if torch.compiler.is_compiling():
        from torch.distributed import _functional_collectives as funcol

        reduced = funcol.all_reduce(rows, "max" if inf_norm else "sum", group.handle)
        return funcol.wait_tensor(reduced)
    dist.all_reduce(rows, dist.ReduceOp.MAX if inf_norm else dist.ReduceOp.SUM,
                    group=group.process_group)
    return rows


def reduced_total(p: Plan, norm_type: float, inv_scale: Tensor | None, backend: str,
                  found_inf: Tensor | None = None,
                  loss: Tensor | None = None) -> tuple[Tensor, torch.dtype]:
    """The row of the whole model, the same on every rank (on the first row's device), and
    the dtype of ``stats`` (float64 if any tensor of any rank's chain here is float64).

    Runs ``p.schedule``: before each all-reduce, the rows that go on to the same groups
    are combined (a sum of rows summed later is the sum of the sums), so a group's
    all-reduce has one row per slot of its step on every member. ``loss`` (0-d, or an
    empty tensor on a rank without one): the row also sums the ranks' losses and counts
    them (columns 3 and 4; their maximum, for the inf norm's MAX all-reduces).
    """
    inf_norm = math.isinf(norm_type)
    combine = _max_rows if inf_norm else _sum_rows
    width = 3 if loss is None else 5
    loss_chain = None if loss is None else _loss_chain(p)
    pending: dict[frozenset, list[Tensor]] = {}
    done: list[Tensor] = []
    dtype = torch.float32
    for chain, tensors in p.chains.items():
        device = tensors[0].device if tensors else chain[0].device
        row, row_dtype = _row(tensors, norm_type, inv_scale, backend, device, width)
        if row_dtype == torch.float64:
            dtype = torch.float64
        if found_inf is not None:
            row = row + torch.cat([row.new_zeros(2), found_inf.reshape(1).to(row),
                                   row.new_zeros(width - 3)])
        if loss is not None and chain == loss_chain:
            row = row + torch.cat([row.new_zeros(3), _loss_columns(loss, row)])
        if chain:
            pending.setdefault(frozenset(chain), []).append(row)
        else:
            done.append(row)
    for step in p.schedule:
        group = step.group
        parts: dict[frozenset, list[Tensor]] = {slot: [] for slot in step.slots}
        for key in [key for key in pending if group in key]:
            parts[key - {group}].extend(row.to(group.device) for row in pending.pop(key))
        stacked = torch.stack([combine(parts[slot]) if parts[slot] else
                               torch.zeros(width, dtype=torch.float64, device=group.device)
                               for slot in step.slots])
        reduced = _all_reduce(stacked, group, inf_norm)
        done.append(reduced[0])
        for index, slot in enumerate(step.slots[1:], start=1):
            pending.setdefault(slot, []).append(reduced[index])
    if not done:
        done.append(torch.zeros(width, dtype=torch.float64))
    first = done[0].device
    total = combine([row.to(first) for row in done])
    if loss is not None and loss_chain is None:
        total = total.clone()
        total[3:] = _all_reduce(_loss_columns(loss, total), _world(), inf_norm)
    return total, dtype


def _loss_columns(loss: Tensor, like: Tensor) -> Tensor:
    """``[loss, 1]``, or ``[0, 0]`` for a rank without a loss (an empty tensor: a pipeline
    stage before the last)."""
    if loss.numel() == 0:
        return like.new_zeros(2)
    return torch.stack([loss.reshape(()).to(like), like.new_ones(())])


def _world() -> _Group:
    group = _process_group(torch.distributed.group.WORLD, "the default process group")
    if group is None:  # one rank: the all-reduce of a group of one
        raise RuntimeError("a single-rank job has nothing to average a loss over")
    return group


def _sum_rows(rows: list[Tensor]) -> Tensor:
    return rows[0] if len(rows) == 1 else torch.stack(rows).sum(0)


def _max_rows(rows: list[Tensor]) -> Tensor:
    return rows[0] if len(rows) == 1 else torch.stack(rows).amax(0)


def reduced_stats(p: Plan, norm_type: float, max_norm: float, inv_scale: Tensor | None,
                  backend: str, found_inf: Tensor | None = None,
                  loss: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``stats`` (:mod:`gradclip.backends.base`) of the whole model, on every rank, and the
    mean of the ranks' ``loss`` (``None`` when not given; their largest under the inf norm).

    ``max_norm``: the float threshold whose factor ``stats`` holds (``inf``: 1).
    ``found_inf``: a flag this rank already has (a scaler unscaled); it is reduced with
    the norm, and overwritten in place with the flag of all ranks, so that every rank
    skips the same steps. ``loss``: this rank's loss (an empty tensor when it has none);
    it rides in the norm's all-reduces when one chain reaches every rank.
    """
    total, dtype = reduced_total(p, norm_type, inv_scale, backend, found_inf, loss)
    value = total[_VALUE]
    norm = value if math.isinf(norm_type) else value.pow(1.0 / norm_type)
    norm = torch.where(total[_NAN] > 0, math.nan, norm).to(dtype)
    nonfinite = (total[_NONFINITE] > 0).to(dtype)
    if found_inf is not None:
        found_inf.copy_(nonfinite.reshape(found_inf.shape))
    inv = None if inv_scale is None else inv_scale.to(norm.device).reshape(())
    coef = clip_coefficient(norm, max_norm, inv).to(dtype)
    mean_loss = None if loss is None else total[3] / total[4]
    return torch.stack([norm, coef, nonfinite]), mean_loss


def as_returned_norm(norm: Tensor, p: Plan) -> Tensor:
    """The norm as the public functions return it: a DTensor replicated on the first
    gradient's mesh when any gradient is a DTensor (as torch returns; ``full_tensor()``,
    ``to_local()`` and ``item()`` all give the global norm), else the plain tensor."""
    if p.mesh is None:
        return norm
    from torch.distributed.tensor import DTensor, Replicate

    mesh = p.mesh
    return DTensor.from_local(norm.to(_device_of_mesh(mesh)), mesh, [Replicate()] * mesh.ndim,
                              run_check=False)


def local_value(tensor: Tensor) -> Tensor:
    """A norm given back to us (``clip_grads_with_norm_``) as a plain tensor: a replicated
    DTensor's local value, or a Partial one (torch's own result) reduced."""
    dtensor = _dtensor_class()
    if dtensor is None or not isinstance(tensor, dtensor):
        return tensor
    if all(placement.is_replicate() for placement in tensor.placements):
        return tensor.to_local()
    return tensor.full_tensor()


def local_tensors(tensors: Iterable[Tensor]) -> list[Tensor]:
    """The local shards of DTensors; other tensors as they are (elementwise ops). A list
    without DTensors is returned as it is (no per-tensor work)."""
    tensors = tensors if isinstance(tensors, list) else list(tensors)
    if not has_dtensor(tensors):
        return tensors
    dtensor = _dtensor_class()
    return [_local_of(t) if isinstance(t, dtensor) else t for t in tensors]


# -- GRADCLIP_CHECK_RANKS=1: do the ranks agree? ---------------------------------------

_CHECK_PRIME = (1 << 31) - 1  # lanes are summed over ranks modulo this, in int64
_CHECK_LANES = 4


def checks_ranks() -> bool:
    """Whether ``GRADCLIP_CHECK_RANKS`` asks for the rank-consistency check."""
    return os.environ.get(CHECK_RANKS_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _lanes(*parts) -> list[int]:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=4 * _CHECK_LANES).digest()
    return [int.from_bytes(digest[i:i + 4], "little") % _CHECK_PRIME
            for i in range(0, 4 * _CHECK_LANES, 4)]


def _dtensors_by_mesh(tensors: Sequence[Tensor], silent_owners: Sequence[Tensor]) -> dict:
    """This rank's DTensors (gradients, and parameters without one: their layouts are the
    gradients'), as (global shape, placements), per mesh (its shape and ranks)."""
    dtensor = _dtensor_class()
    found: dict[tuple, list] = {}
    if dtensor is None:
        return found
    for t in list(tensors) + list(silent_owners):
        if isinstance(t, dtensor):
            mesh = t._spec.mesh
            key = (tuple(mesh.shape), tuple(mesh.mesh.reshape(-1).tolist()))
            found.setdefault(key, []).append((tuple(t.shape), repr(tuple(t._spec.placements))))
    return found


def _check_ranks(p: Plan | None, tensors: Sequence[Tensor], silent_owners: Sequence[Tensor],
                 failed: bool) -> None:
    """One all-reduce over the default group: every rank of a mesh passed the same
    DTensors, and every member of a group lays out its all-reduce alike; else raise on
    every rank. A rank that ``failed`` to plan joins it too, so that the others raise
    instead of waiting for it.

    Each rank adds, for every mesh and group it takes part in, a hash of what it passed
    there; the first rank of each subtracts its hash times the number of members. The
    sum over all ranks is zero (modulo a prime, in every lane) when every member agrees.
    """
    dist = torch.distributed
    me = dist.get_rank()
    blocks: dict[tuple, tuple] = {}
    by_mesh = _dtensors_by_mesh(tensors, silent_owners)
    for (shape, ranks), items in by_mesh.items():
        blocks[("mesh", shape, ranks)] = (ranks, tuple(sorted(items)))
    for step in () if p is None else p.schedule:
        group = step.group
        members = tuple(sorted(group.members))
        blocks[("group", group.order, members)] = (members, step.layout)
    lanes = [0] * _CHECK_LANES
    for key, (members, digest) in blocks.items():
        weight = 1 - (len(members) if me == min(members) else 0)
        lanes = [(lane + weight * value) % _CHECK_PRIME
                 for lane, value in zip(lanes, _lanes(key, digest))]
    world = dist.group.WORLD
    totals = torch.tensor(lanes + [int(failed)], dtype=torch.int64,
                          device=_device_of_group(world))
    dist.all_reduce(totals, group=world)
    totals = totals.tolist()
    if failed:
        return  # the caller raises its own error
    if totals[-1]:
        raise RuntimeError(f"{CHECK_RANKS_ENV}=1: {totals[-1]} other rank(s) raised an error "
                           "while planning this clip (see their messages); this rank raises "
                           "too, so that none is left waiting in a collective")
    if any(total % _CHECK_PRIME for total in totals[:-1]):
        raise ValueError(f"{CHECK_RANKS_ENV}=1: the ranks did not pass the same sharded "
                         "tensors. On some mesh, a rank passed DTensors (count, global shapes "
                         "or placements) that another rank of that mesh did not, or the members "
                         "of a process group would reduce different rows: the norm would differ "
                         "between ranks (or a rank would wait in a collective). Pass every "
                         "rank the gradients of the same parameters. This rank "
                         f"({me}) passed: {_summary(by_mesh, p)}")


def _summary(by_mesh: dict, p: Plan | None) -> str:
    parts = []
    for (shape, ranks), items in by_mesh.items():
        listed = ", ".join(f"{s} {placements}" for s, placements in sorted(items)[:6])
        more = f", and {len(items) - 6} more" if len(items) > 6 else ""
        parts.append(f"{len(items)} DTensor(s) on the mesh of shape {shape} over ranks "
                     f"{list(ranks)}: {listed}{more}")
    groups = [] if p is None else [step.group.describe() for step in p.schedule]
    if groups:
        parts.append("reducing over " + ", ".join(groups))
    return "; ".join(parts) or "no DTensor and no group"


# -- torch.compile(fullgraph=True) ------------------------------------------------------

_FULLGRAPH_REFUSAL = (
    "gradclip: a sharded clip plans on the host",
    "gradclip finds the process groups each sharded gradient is summed over by reading "
    "Python objects (DeviceMesh, ProcessGroup, DTensor placements, process_group=) that "
    "torch.compile cannot trace. That step runs eagerly: a sharded clip breaks the graph "
    "once, before its reduction; the all-reduces, the clip coefficient and the scaling "
    "after it are traced. fullgraph=True forbids that graph break.",
    ["Compile without fullgraph=True: the clip then costs one graph break.",
     "Or call the clip (or ClippedOptimizer.step()) outside the compiled function, e.g. "
     "compile the model's forward and backward only.",
     "Unsharded gradients (no DTensor, no process_group) compile with fullgraph=True."])


def _break_graph_before_planning() -> None:
    """Under Dynamo, graph-break with gradclip's reason before the eager plan: with
    ``fullgraph=True`` that reason is the error the user sees."""
    from torch._dynamo.comptime import comptime

    comptime(_refuse_in_one_graph)


def _refuse_in_one_graph(ctx) -> None:
    from torch._dynamo import exc

    gb_type, explanation, hints = _FULLGRAPH_REFUSAL
    try:
        exc.unimplemented(gb_type=gb_type, context="gradclip.distributed.plan",
                          explanation=explanation, hints=hints)
    except TypeError:  # a torch whose unimplemented() takes one message
        raise exc.Unsupported("\n".join([gb_type, explanation] + hints)) from None


__all__ = ["CHECK_RANKS_ENV", "Plan", "as_returned_norm", "checks_ranks", "has_dtensor",
           "involved", "local_tensors", "local_value", "plan", "reduced_stats", "reduced_total"]
