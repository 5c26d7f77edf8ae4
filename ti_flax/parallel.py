"""Putting trees on the devices for a step, and feeding it batches: two layouts.

`Replicated` is the pmap layout (every run but --shard_weights): each tree with a leading device
axis, the frozen weights and the state one copy per device, laid out with the same sharding the
pmapped step gives its outputs, so the donated state it returns can go straight back in without a
retrace or a reshard. `Sharded` is --shard_weights' (FSDP): the frozen weights split over a Mesh
of the devices leaf by leaf (`weight_spec`), the batch still one slice per device, and the step
one jit program over the mesh (`mesh_map`, GSPMD). Both keep a batch's leading device axis and
let `unreplicate` read the state and metrics, so the loop, the actions and checkpoints do not
ask which one a run has.
"""

import collections
import functools
import itertools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "devices"
# --shard_weights leaves a frozen leaf of fewer elements whole on every device (biases, norms):
# splitting it saves little memory and costs a gather each use.
MIN_SHARDED = 2**14
# mesh_map's argument and output kinds: a batch with a leading device axis, split over the devices,
# which the program sees merged into one global batch; a tree with a leading axis of one (the
# state, a key), which the program sees without it. None: as placed (the frozen weights).
SPLIT, ONE = "split", "one"


def device_sharding(devices):
    """Leading axis split over `devices`: the layout pmap gives its inputs and outputs."""
    return NamedSharding(Mesh(np.asarray(devices), (AXIS,)), PartitionSpec(AXIS))


def pmap_devices(devices):
    """The `devices` argument for jax.pmap: in a multi-process run it must be None, so the
    mapped axis (and every collective) spans the devices of all processes."""
    return None if jax.process_count() > 1 else tuple(devices)


@functools.lru_cache(maxsize=None)
def _any_fn(devices):
    return jax.pmap(lambda x: jax.lax.pmax(x, AXIS), axis_name=AXIS, devices=pmap_devices(devices))


def stop_vote(flag, devices):
    """Whether any process asked to stop, agreed through a collective (not the filesystem).

    Returns a value to read later with `bool(...)`: a device array in a multi-process run
    (so reading it can lag a step behind, like the metrics), the flag itself otherwise.
    """
    if jax.process_count() == 1:
        return bool(flag)
    return _any_fn(tuple(devices))(np.full((len(devices),), int(bool(flag)), np.int32))


def vote_result(vote):
    return bool(vote) if isinstance(vote, bool) else bool(np.asarray(vote)[0])


def replicate(tree, devices):
    """One copy of each leaf per device, stacked on a leading device axis."""
    sharding = device_sharding(devices)

    def put(x):
        x = np.asarray(x)
        # broadcast_to is a view: each device receives its copy without n copies on the host.
        return jax.device_put(np.broadcast_to(x, (len(devices),) + x.shape), sharding)

    return jax.tree_util.tree_map(put, tree)


def shapes(tree, devices=None):
    """Each leaf as a jax.ShapeDtypeStruct (nothing copied); with `devices`, as `replicate`
    would lay it out, with a leading device axis."""
    lead = (len(devices),) if devices is not None else ()
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(lead + tuple(np.shape(x)), x.dtype), tree)


def unreplicate(tree):
    """The first device's copy of each leaf, on the host as numpy."""
    return jax.tree_util.tree_map(lambda x: np.asarray(x[0]), jax.device_get(tree))


def local_rows(x):
    """This process's rows of a pmap output, in device order, as numpy [local devices, ...]."""
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    return np.concatenate([np.asarray(s.data) for s in shards])


def shard(batch, devices):
    """Put a host batch shaped [num_devices, ...] on the devices, one slice each."""
    sharding = device_sharding(devices)
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), batch)


def prefetch_to_devices(batches, devices, size=2):
    """Yield device batches while the next `size - 1` are already being copied over.

    Copies are asynchronous, so the transfer of batch k+1 overlaps step k.
    """
    return prefetch(batches, functools.partial(shard, devices=devices), size)


def prefetch(batches, put, size=2):
    """`prefetch_to_devices` with `put` (a layout's `batch`) placing each batch."""
    queue = collections.deque()
    batches = iter(batches)
    for batch in itertools.islice(batches, size):
        queue.append(put(batch))
    while queue:
        yield queue.popleft()
        for batch in itertools.islice(batches, 1):
            queue.append(put(batch))


# --------------------------------------------------------------------------------------------
# Layouts: where a run's frozen weights, state and batches go


class Replicated:
    """The pmap layout: every tree with a leading device axis; the frozen weights and the state
    one copy per device (`replicate`), a batch [devices, per device, ...] one slice each (`shard`).
    Programs over it are jax.pmap's."""

    sharded = False

    def __init__(self, devices):
        self.devices = tuple(devices)

    def weights(self, tree):
        return replicate(tree, self.devices)

    def state(self, tree):
        return replicate(tree, self.devices)

    def batch(self, tree):
        return shard(tree, self.devices)

    def prefetch(self, batches, size=2):
        return prefetch(batches, self.batch, size)

    def weight_shapes(self, tree):
        return shapes(tree, self.devices)

    def state_shapes(self, tree):
        return shapes(tree, self.devices)

    def batch_shapes(self, tree):
        return shapes(tree)

    def shapes_of(self, tree):
        """A tree placed by this layout, as its program's jax.ShapeDtypeStruct arguments."""
        return shapes(tree)


def mesh_devices(devices):
    """The devices of `Sharded`'s mesh: `devices`, or in a multi-process run every process's
    (as pmap spans them), each process's together and in process order, so that each process's
    slices of a global batch are its own devices'."""
    if jax.process_count() == 1:
        return tuple(devices)
    return tuple(sorted(jax.devices(), key=lambda d: (d.process_index, d.id)))


def weight_spec(shape, count):
    """How --shard_weights splits a frozen leaf of `shape` over `count` devices: along its largest
    axis that `count` divides (the first such, on a tie), or not at all (PartitionSpec(): whole on
    every device) for a leaf under MIN_SHARDED elements or with no such axis."""
    if count == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARDED:
        return PartitionSpec()
    divisible = [i for i, n in enumerate(shape) if n % count == 0]
    if not divisible:
        return PartitionSpec()
    axis = max(divisible, key=lambda i: shape[i])
    return PartitionSpec(*[None] * axis, AXIS)


class Sharded:
    """--shard_weights' layout (FSDP): one program over a Mesh of the run's devices (`mesh_map`).

    The frozen weights are split over the devices leaf by leaf (`weight_spec`): a device holds its
    slice of each large leaf. The state and a key are one copy, whole on every device, with a
    leading axis of one, so `unreplicate` reads them as it reads a replicated tree. A batch keeps
    the pmap layout's [devices, per device, ...] with its leading axis split over the devices; in
    a multi-process run each process gives its own slices of the global batch.
    """

    sharded = True

    def __init__(self, devices):
        self.devices = tuple(devices)
        self.mesh = Mesh(np.asarray(mesh_devices(self.devices)), (AXIS,))
        self.whole = NamedSharding(self.mesh, PartitionSpec())
        self.split = NamedSharding(self.mesh, PartitionSpec(AXIS))

    def weight_sharding(self, shape):
        return NamedSharding(self.mesh, weight_spec(tuple(shape), self.mesh.size))

    def weights(self, tree):
        def put(x):
            x = np.asarray(x)
            # Each device reads its own slice of the host array: no whole copy per device.
            return jax.make_array_from_callback(x.shape, self.weight_sharding(x.shape), lambda index: x[index])

        return jax.tree_util.tree_map(put, tree)

    def state(self, tree):
        def put(x):
            x = np.asarray(x)[None]
            return jax.make_array_from_callback(x.shape, self.whole, lambda index: x[index])

        return jax.tree_util.tree_map(put, tree)

    def batch(self, tree):
        return jax.tree_util.tree_map(lambda x: jax.make_array_from_process_local_data(self.split, np.asarray(x)), tree)

    def prefetch(self, batches, size=2):
        return prefetch(batches, self.batch, size)

    def weight_shapes(self, tree):
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(tuple(np.shape(x)), x.dtype, sharding=self.weight_sharding(np.shape(x))),
            tree)

    def state_shapes(self, tree):
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct((1,) + tuple(np.shape(x)), x.dtype, sharding=self.whole), tree)

    def batch_shapes(self, tree):
        """A host batch's (this process's slices: [local devices, ...]) global shapes."""
        return jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct((np.shape(x)[0] * jax.process_count(),) + tuple(np.shape(x)[1:]), x.dtype,
                                           sharding=self.split), tree)

    def shapes_of(self, tree):
        """A tree placed by this layout, as its program's jax.ShapeDtypeStruct arguments (shardings kept)."""
        return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def layout(devices, sharded=False):
    """The run's layout over `devices`: `Sharded` with --shard_weights, else `Replicated`."""
    return Sharded(devices) if sharded else Replicated(devices)


def mesh_map(fn, devices, in_kinds, out_kinds, donate_argnums=()):
    """`fn` as one jit program over `Sharded(devices)`'s mesh: the sharded layout's pmap.

    `fn` sees the global batch, and no collective is needed: the compiler (GSPMD) splits the work
    by the arguments' shardings. Each argument of kind SPLIT (a [devices, per device, ...] batch)
    comes in as [devices x per device, ...], still one slice per device; each of kind ONE (a
    leading axis of one) without that axis; each of kind None as it is. Its outputs go back as
    `out_kinds` says (one kind for them all, or a tuple of kinds, one per output): SPLIT ones as
    [devices, per device, ...] split over the devices, ONE ones with a leading axis of one, whole
    on every device. `donate_argnums` as for jax.jit. Compile it ahead with shapes from the
    layout (`Sharded.*_shapes`), which carry the shardings.
    """
    placed = Sharded(devices)
    count = placed.mesh.size

    def merge(x):  # [devices, B, ...] -> [devices x B, ...], device d's examples still on device d
        return jax.lax.with_sharding_constraint(x.reshape((-1,) + x.shape[2:]), placed.split)

    def unpack(kind, tree):
        if kind == SPLIT:
            return jax.tree_util.tree_map(merge, tree)
        return jax.tree_util.tree_map(lambda x: x[0], tree) if kind == ONE else tree

    def pack(kind, tree):
        if kind == SPLIT:
            return jax.tree_util.tree_map(lambda x: x.reshape((count, -1) + x.shape[1:]), tree)
        return jax.tree_util.tree_map(lambda x: x[None], tree)

    def sharding(kind):
        return placed.split if kind == SPLIT else placed.whole

    def body(*args):
        out = fn(*(unpack(kind, arg) for kind, arg in zip(in_kinds, args, strict=True)))
        if isinstance(out_kinds, tuple):
            return tuple(pack(kind, part) for kind, part in zip(out_kinds, out, strict=True))
        return pack(out_kinds, out)

    out_shardings = tuple(map(sharding, out_kinds)) if isinstance(out_kinds, tuple) else sharding(out_kinds)
    return jax.jit(body, out_shardings=out_shardings, donate_argnums=donate_argnums)
