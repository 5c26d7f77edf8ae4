"""Putting trees on the local devices for a pmapped step, and feeding it batches.

Replicated trees are laid out with the same sharding the pmapped step gives its outputs, so
the donated state it returns can go straight back in without a retrace or a reshard.
"""

import collections
import functools
import itertools

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "devices"


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
    queue = collections.deque()
    batches = iter(batches)
    for batch in itertools.islice(batches, size):
        queue.append(shard(batch, devices))
    while queue:
        yield queue.popleft()
        for batch in itertools.islice(batches, 1):
            queue.append(shard(batch, devices))
