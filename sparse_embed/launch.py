"""What the launcher of this process says about it, read from the environment alone.

Entry points need to know, before TensorFlow or Horovod is imported, whether
they run under `horovodrun` (Gloo or MPI) or a `TF_CONFIG` cluster, and which
rank they are: user errors are printed by rank 0 only, and `backend: auto`
picks its backend from the same facts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

# Set by horovodrun for every process: Gloo sets HOROVOD_*, MPI launches set the
# MPI implementation's own rank variables (Open MPI, then MPICH / Intel MPI).
_HOROVOD_RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


def launched_by_horovod(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether `horovodrun` (or mpirun) started this process.

    Args:
        environ: The process environment.
    """
    return any(name in environ for name in _HOROVOD_RANK_VARS)


def has_tf_config(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether a `TF_CONFIG` cluster spec with more than one task is set.

    Args:
        environ: The process environment.
    """
    try:
        cluster = json.loads(environ.get("TF_CONFIG", "") or "{}").get("cluster", {})
    except (json.JSONDecodeError, AttributeError):
        return False
    return sum(len(tasks) for tasks in cluster.values()) > 1


def process_rank(environ: Mapping[str, str] = os.environ) -> int:
    """This process's rank among the launched processes (0 when launched alone).

    Args:
        environ: The process environment.
    """
    for name in _HOROVOD_RANK_VARS:
        if name in environ:
            return int(environ[name])
    if has_tf_config(environ):
        task = json.loads(environ["TF_CONFIG"]).get("task", {})
        return int(task.get("index", 0))
    return 0
