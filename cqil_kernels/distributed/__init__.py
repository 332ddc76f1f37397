"""Several processes, one model: a CQIL group's layers split over ranks, one reduction per group.

One module per concept:

- ``launch``: :func:`init` / :func:`destroy` - the torchrun environment, backend, timeout, device;
- ``placement``: :func:`place` - which layers each rank holds (contiguous blocks of each group);
- ``communicator``: :class:`Communicator` - the group's all-reduce / all-gather on NCCL, gloo or
  symmetric memory, sync and async;
- ``symmetric``: the symmetric-memory buffers and kernels behind it;
- ``consistency``: :func:`fingerprint` / :func:`check_consistent` - ranks started differently are
  refused at start;
- ``faults``: :class:`DistributedError`, :func:`check_alive` - dead or hung peers end the run
  within a timeout;
- ``latency_model``: modeled ms/step on W devices from one-device segment times;
- ``selftest``: ``torchrun --standalone --nproc-per-node=2 -m cqil_kernels.distributed.selftest``.

Importing this package creates no process group and touches no GPU.
"""

from .communicator import ENGINES, Choice, Communicator, Handle, ReducePolicy, choose_engine
from .consistency import RankMismatchError, check_consistent, check_same, fingerprint, shared_seed, weight_fingerprint
from .faults import DistributedError, check_alive, collective_guard, wait_event
from .launch import DEFAULT_TIMEOUT_S, DistContext, LaunchEnv, destroy, init
from .placement import Placement, place
from .symmetric import SymmetricSupport

__all__ = [
    # launch
    "init",
    "destroy",
    "DistContext",
    "LaunchEnv",
    "DEFAULT_TIMEOUT_S",
    # placement
    "place",
    "Placement",
    # collectives
    "Communicator",
    "ReducePolicy",
    "Handle",
    "Choice",
    "choose_engine",
    "ENGINES",
    "SymmetricSupport",
    # start-up checks and faults
    "fingerprint",
    "weight_fingerprint",
    "check_consistent",
    "shared_seed",
    "check_same",
    "RankMismatchError",
    "DistributedError",
    "check_alive",
    "collective_guard",
    "wait_event",
]
