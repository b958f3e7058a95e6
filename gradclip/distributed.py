"""Global norms of sharded gradients: DTensors, ``process_group=`` and (tensors, group) pairs.

Every norm that ``gradclip.functional`` and ``ClippedOptimizer`` compute goes through
:func:`norm_stats` when a gradient is a DTensor or a ``process_group`` is given; plain
single-process calls never reach this module (:func:`involved` is their only cost).

How a norm is reduced (the design, in ``docs/distributed.md``):

1. Each gradient gets a *chain*: the process groups its p-th power sum must be summed
   over. A DTensor contributes one group per mesh dimension that shards it (``Shard``);
   ``Replicate`` dimensions hold copies and are not reduced, so they count once; a
   ``Partial`` placement is refused (its local values are not a part of the gradient).
   ``process_group=`` appends its group to every chain; a (tensors, group) pair appends
   its group to the chains of its tensors.
2. The tensors of one chain are measured together by the backend, on their local shards,
   in one read: a *row* ``[sum |g|^p (max |g| for inf), NaN flag, inf/NaN flag]`` in
   float64.
3. Each distinct group is reduced once: the rows of the chains that end at it are summed,
   those that go on are stacked after them, and all are all-reduced together (SUM, MAX
   for the inf norm): a functional collective when ``torch.compile`` traces it, the c10d
   op eagerly; neither reads the host. Groups are reduced in one order on every rank
   (mesh dimensions before ``process_group``s, then by mesh dimension and name), so
   ranks never wait on each other crosswise. The plan that finds the chains is host
   bookkeeping and runs eagerly under ``torch.compile``.
4. The rows are combined on the device, the root taken, and the clip coefficient
   computed there; each rank then scales its own local shards.

NaN is carried as a flag because a MAX all-reduce need not propagate it.
"""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat

import torch
from torch import Tensor

from .backends import dispatch
from .eager import run_eagerly
from .backends.base import NORM, clip_coefficient

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
    grads = list(map(_grad_of, parameters))
    if not any(map(operator.is_, grads, repeat(None))):
        return grads, []
    return ([g for g in grads if g is not None],
            [p for p, g in zip(parameters, grads) if g is None])


def involved(tensors: Sequence[Tensor], process_group) -> bool:
    """Whether a norm of ``tensors`` must go through this module."""
    return process_group is not None or has_dtensor(tensors)


# -- what each tensor is reduced over -------------------------------------------------


@dataclass(frozen=True)
class _Group:
    """One process group a row is summed over; ``order`` fixes the reduction order."""

    order: tuple
    name: str
    handle: object  # what functional collectives take: a ProcessGroup or (mesh, dim)
    device: torch.device
    process_group: object  # the ProcessGroup itself (eager all-reduce)

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


def _process_group(group, what: str) -> _Group:
    dist = torch.distributed
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        # What new_group() returns on the ranks it leaves out.
        raise ValueError(f"{what} does not contain this rank ({dist.get_rank()}); pass, on each "
                         "rank, a group that the rank belongs to")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{what} must be a torch.distributed.ProcessGroup (for a DeviceMesh "
                        f"dimension, pass mesh.get_group(dim)), got {type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError(f"{what} does not contain this rank ({dist.get_rank()}); pass, on each "
                         "rank, a group that the rank belongs to")
    return _Group((1, 0, group.group_name), group.group_name, group, _device_of_group(group),
                  group)


class _MeshLayouts:
    """The groups that reduce a DTensor, per (mesh, placements), computed once.

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


def _mesh_chain(mesh, placements) -> tuple[_Group, ...]:
    if mesh.get_coordinate() is None:
        raise ValueError(f"a gradient is a DTensor on {mesh}, which does not contain this rank "
                         f"({torch.distributed.get_rank()}); its norm can only be taken on the "
                         "mesh's ranks. Pass each rank only the gradients it holds a shard of.")
    chain = []
    for dim, placement in enumerate(placements):
        if _shards(placement, dim, placements):
            group = mesh.get_group(dim)
            chain.append(_Group((0, dim, group.group_name), group.group_name, (mesh, dim),
                                _device_of_mesh(mesh), group))
    return tuple(chain)


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


_layouts = _MeshLayouts()


# -- which tensors go where -----------------------------------------------------------


@dataclass
class Plan:
    """The tensors of one call, by chain, as local (plain) tensors.

    ``chains`` maps a chain to the local tensors measured together; a chain may hold no
    tensor (a rank whose parameters have no gradient there still joins the reduction).
    ``locals`` is every local tensor, in input order (what a clip scales). ``mesh`` is the
    first DTensor's mesh (where a DTensor result lives), or ``None``.
    """

    chains: dict[tuple[_Group, ...], list[Tensor]]
    locals: list[Tensor]
    mesh: object = None


def _pair_groups(pairs) -> tuple[dict[int, object], list[_Group]]:
    """From (tensors, group) pairs: the group of each listed tensor (by id; a parameter's
    ``.grad`` too, so that pairs of parameters also sort their gradients) and the groups."""
    where: dict[int, object] = {}
    groups: list[_Group] = []
    for index, pair in enumerate(pairs):
        try:
            tensors, group = pair
        except (TypeError, ValueError):
            raise TypeError(f"process_group[{index}] must be a (tensors, group) pair, got "
                            f"{type(pair).__name__}; see docs/distributed.md") from None
        described = None if group is None else _process_group(group, f"process_group[{index}][1]")
        if described is not None:
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
    this rank must join even without a tensor in it."""
    if process_group is None:
        return [None] * len(items), []
    if not isinstance(process_group, (list, tuple)):
        tail = _process_group(process_group, "process_group")
        return [tail] * len(items), [tail]
    where, groups = _pair_groups(process_group)
    missing = sum(id(t) not in where for t in items)
    if missing:
        raise ValueError(f"{missing} of the {len(items)} tensors or parameters passed are in no "
                         "(tensors, group) pair of process_group; list every one of them (group "
                         "None for those that need no reduction)")
    return [where[id(t)] for t in items], groups


# Host-side bookkeeping over Python objects (meshes, groups, caches keyed by identity):
# under torch.compile it runs eagerly, and the reduction after it is traced.
@run_eagerly
def plan(tensors: Sequence[Tensor], process_group=None, *,
         silent_owners: Sequence[Tensor] = ()) -> Plan:
    """Sort ``tensors`` into chains.

    ``silent_owners``: parameters without a gradient on this rank; the reductions of
    their chains are still joined, so that ranks whose gradients are missing do not
    leave the others waiting.
    """
    dtensor = _dtensor_class()
    tensors = tensors if isinstance(tensors, list) else list(tensors)
    tails, joined = _tails(tensors + list(silent_owners), process_group)
    if dtensor is not None and tensors and all(map(isinstance, tensors, repeat(dtensor))):
        # Only DTensors (FSDP2): the per-tensor work in C-level maps.
        specs = list(map(_spec_of, tensors))
        local_tensors = list(map(_local_of, tensors))
        per_tensor = _layouts.chains(specs)
        mesh = specs[0].mesh
    else:
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
    if process_group is not None:
        per_tensor = [chain if tail is None else _with_tail(chain, tail)
                      for chain, tail in zip(per_tensor, tails)]
    chains: dict[tuple[_Group, ...], list[Tensor]] = {}
    first = per_tensor[0] if per_tensor else None
    if first is not None and per_tensor.count(first) == len(per_tensor):
        chains[first] = local_tensors  # one chain: the common case
    else:
        for chain, t in zip(per_tensor, local_tensors):
            chains.setdefault(chain, []).append(t)
    for owner, tail in zip(silent_owners, tails[len(tensors):]):
        chain = ()
        if dtensor is not None and isinstance(owner, dtensor):
            chain = _layouts.chain(owner._spec)
            mesh = owner._spec.mesh if mesh is None else mesh
        if tail is not None:
            chain = _with_tail(chain, tail)
        if chain:
            chains.setdefault(chain, [])
    for group in joined:
        if not any(group in chain for chain in chains):
            chains[(group,)] = []
    return Plan(chains, local_tensors, mesh)


def _with_tail(chain: tuple[_Group, ...], tail: _Group) -> tuple[_Group, ...]:
    if tail in chain:
        raise ValueError(f"process_group {tail.name!r} is also a mesh dimension that shards a "
                         "DTensor gradient: DTensors are already reduced over their meshes, and "
                         "reducing again would count them several times. Pass process_group only "
                         "for what the meshes do not cover (pipeline stages, plain shards).")
    return chain + (tail,)


# -- the reduction --------------------------------------------------------------------


def _row(tensors: list[Tensor], norm_type: float, inv_scale: Tensor | None, backend: str,
         device: torch.device) -> tuple[Tensor, torch.dtype]:
    """``[sum |g|^p (or max |g|), NaN flag, inf/NaN flag]`` in float64 for these tensors,
    and the dtype of their ``stats`` (float64 if any tensor is float64)."""
    if not tensors:
        return torch.zeros(3, dtype=torch.float64, device=device), torch.float32
    stats = dispatch.norm_stats(tensors, norm_type, math.inf, inv_scale, backend)
    dtype = stats.dtype
    stats = stats.to(torch.float64)
    norm = stats[NORM]
    is_nan = norm.isnan()
    value = torch.where(is_nan, 0.0, norm)
    if not math.isinf(norm_type):
        value = value.pow(norm_type)
    return torch.stack([value, is_nan.to(torch.float64), stats[2]]).to(device), dtype


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
                  found_inf: Tensor | None = None) -> tuple[Tensor, torch.dtype]:
    """The row of the whole model, the same on every rank (on the first row's device), and
    the dtype of ``stats`` (float64 if any tensor of any rank's chain here is float64).

    Each group is reduced in one collective whose shape every member agrees on: one row
    for the chains that end at the group (their sum), then one per chain that goes on to
    further mesh dimensions (the same on every rank of a mesh, in mesh-dimension order).
    """
    inf_norm = math.isinf(norm_type)
    combine = _max_rows if inf_norm else _sum_rows
    rows: dict[tuple[_Group, ...], Tensor] = {}
    dtype = torch.float32
    for chain, tensors in p.chains.items():
        device = tensors[0].device if tensors else chain[0].device
        row, row_dtype = _row(tensors, norm_type, inv_scale, backend, device)
        if row_dtype == torch.float64:
            dtype = torch.float64
        if found_inf is not None:
            row = row + torch.cat([row.new_zeros(2), found_inf.reshape(1).to(row)])
        rows[chain] = row
    done = [row for chain, row in rows.items() if not chain]
    pending = {chain: row for chain, row in rows.items() if chain}
    for group in sorted({g for chain in pending for g in chain}, key=lambda g: g.order):
        members = [chain for chain in pending if group in chain]
        ending = [chain for chain in members if chain[-1] == group]
        going_on = sorted((chain for chain in members if chain[-1] != group),
                          key=lambda chain: _rest_order(chain, group))
        end_row = (combine([pending[chain].to(group.device) for chain in ending]) if ending
                   else torch.zeros(3, dtype=torch.float64, device=group.device))
        stacked = torch.stack([end_row] + [pending[chain].to(group.device) for chain in going_on])
        reduced = _all_reduce(stacked, group, inf_norm)
        for chain in ending:
            del pending[chain]
        done.append(reduced[0])
        for index, chain in enumerate(going_on, start=1):
            pending[chain] = reduced[index]
    if not done:
        return torch.zeros(3, dtype=torch.float64), dtype
    first = done[0].device
    return combine([row.to(first) for row in done]), dtype


def _sum_rows(rows: list[Tensor]) -> Tensor:
    return torch.stack(rows).sum(0)


def _max_rows(rows: list[Tensor]) -> Tensor:
    return torch.stack(rows).amax(0)


def _rest_order(chain: tuple[_Group, ...], group: _Group) -> tuple:
    # Mesh dimensions, not group names: the names differ between the ranks of a group.
    return tuple(g.order[:2] for g in chain[chain.index(group) + 1:])


def norm_stats(p: Plan, norm_type: float, max_norm: float | Tensor, inv_scale: Tensor | None,
               backend: str, found_inf: Tensor | None = None) -> Tensor:
    """``stats`` (:mod:`gradclip.backends.base`) of the whole model, on every rank.

    ``found_inf``: a flag this rank already has (a scaler unscaled); it is reduced with
    the norm, and overwritten in place with the flag of all ranks, so that every rank
    skips the same steps.
    """
    total, dtype = reduced_total(p, norm_type, inv_scale, backend, found_inf)
    value = total[_VALUE]
    norm = value if math.isinf(norm_type) else value.pow(1.0 / norm_type)
    norm = torch.where(total[_NAN] > 0, math.nan, norm).to(dtype)
    nonfinite = (total[_NONFINITE] > 0).to(dtype)
    if found_inf is not None:
        found_inf.copy_(nonfinite.reshape(found_inf.shape))
    if callable(getattr(max_norm, "threshold_", None)):
        # A rule (gradclip.ZClip, AutoClip): it sees the global norm, the same on every rank.
        max_norm = max_norm.threshold_(norm)
    if isinstance(max_norm, Tensor):
        max_norm = max_norm.reshape(()).to(device=norm.device, dtype=dtype)
    inv = None if inv_scale is None else inv_scale.to(norm.device).reshape(())
    coef = clip_coefficient(norm, max_norm, inv).to(dtype)
    return torch.stack([norm, coef, nonfinite])


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


__all__ = ["Plan", "as_returned_norm", "has_dtensor", "involved", "local_tensors", "local_value",
           "norm_stats", "plan", "reduced_total"]
