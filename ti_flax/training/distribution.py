"""Multi-host start-up and the few cross-process agreements a run needs.

One process per host, each feeding its local devices; collectives span every device of every
host. On a multi-host Cloud TPU slice JAX finds the coordinator itself; on CPU or GPU clusters
pass --coordinator_address, --num_processes and --process_id.
"""

import os

import jax
import numpy as np

from ..errors import UserError


def on_multihost_tpu():
    """True on a Cloud TPU slice with more than one host (JAX auto-detects the coordinator there)."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts


def initialize(coordinator_address=None, num_processes=None, process_id=None, timeout_s=300):
    """Start JAX's distributed runtime when the run spans several processes; no-op otherwise.

    Must run before anything touches a JAX device.

    Raises:
      UserError: only some of the three flags given, or the coordinator not reached in time.
    """
    given = [coordinator_address is not None, num_processes is not None, process_id is not None]
    if any(given) and not all(given):
        raise UserError("multi-process runs need all of --coordinator_address, --num_processes and --process_id")
    if not any(given) and not on_multihost_tpu():
        return False
    if all(given) and not 0 <= process_id < num_processes:
        raise UserError(f"--process_id must be in [0, {num_processes}), got {process_id}")
    if all(given) and process_id != 0:
        wait_for_coordinator(coordinator_address, timeout_s)
    # CPU collectives across processes need an implementation (JAX's default is none); the
    # setting only concerns the CPU backend, so it is harmless on TPU and GPU.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=int(timeout_s),
        )
    except Exception as err:  # the runtime raises several types for an unreachable coordinator
        where = coordinator_address or "the TPU slice's coordinator"
        raise UserError(
            f"could not join the distributed run at {where} within {timeout_s}s "
            f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); check that process 0 is running "
            "and the address and port are reachable"
        ) from None
    return True


def wait_for_coordinator(address, timeout_s):
    """Wait until process 0's coordinator accepts TCP connections, or raise UserError.

    JAX's runtime aborts the whole process (no exception) when it cannot connect, so the
    address is probed first to fail with a message instead.
    """
    import socket
    import time

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--coordinator_address {address!r}: expected host:port, e.g. 10.0.0.2:1234")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=2):
                return
        except OSError as err:
            if time.monotonic() >= deadline:
                raise UserError(
                    f"could not join the distributed run at {address} within {timeout_s}s ({err}); check that "
                    "process 0 is running and the address and port are reachable"
                ) from None
            time.sleep(0.5)


def broadcast_from_first(tree):
    """Process 0's value of `tree` on every process (numpy leaves); identity on one process."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return jax.tree_util.tree_map(np.asarray, multihost_utils.broadcast_one_to_all(tree))


def broadcast_json(value):
    """Process 0's `value` (anything JSON holds: None, numbers, lists, dicts) on every process,
    exactly: sent as its JSON text's bytes, so floats keep every bit (an array of them would be
    cast to float32 on the way without jax's x64 mode)."""
    if jax.process_count() == 1:
        return value
    import json

    # Bytes as int32: a collective sums or selects every element type the same way.
    text = np.frombuffer(json.dumps(value).encode(), np.uint8).astype(np.int32) if jax.process_index() == 0 else None
    size = int(broadcast_from_first(np.int32(0 if text is None else len(text))))
    text = broadcast_from_first(text if text is not None else np.zeros(size, np.int32))
    return json.loads(np.asarray(text).astype(np.uint8).tobytes().decode())
