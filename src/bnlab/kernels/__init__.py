"""Kernels: the only place that decides how a hot loop is compiled (numba on the CPU, Triton on GPUs).

After ``os.fork()`` (``multiprocessing``'s default start method on Linux: Hogwild training, a
pool of evaluation workers), a child whose parent has run the parallel numba kernels runs their
serial twins instead, compiled on first use there (seconds, once per child). numba's OpenMP
threading layer is not fork-safe: its first parallel loop in such a child kills the child
("fork() called from a process already using GNU OpenMP"). torch's own OpenMP has the same
limit, which ``torch.set_num_threads(1)`` in the child lifts for torch's ops (DataLoader workers
do so); the twins lift it for bnlab's.
"""

import os
import sys


def _serial_twins_in_forked_child() -> None:
    """Swap every parallel numba kernel of the loaded kernel modules for a serial twin (the same
    loops, ``prange`` as ``range``), where the parent launched numba's OpenMP threads (TBB and
    numba's workqueue are fork-safe: nothing to do). Not cached: numba's cache files are keyed
    by the function and its signature, not by ``parallel``, so a cached twin could load the
    parallel code."""
    parallel = sys.modules.get("numba.np.ufunc.parallel")
    if parallel is None or not getattr(parallel, "_is_initialized", False):
        return
    import numba

    if numba.threading_layer() != "omp":
        return
    twins = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith(__name__ + ".") or module is None:
            continue
        for attribute, kernel in list(vars(module).items()):
            if isinstance(kernel, numba.core.registry.CPUDispatcher) and kernel.targetoptions.get("parallel"):
                if id(kernel) not in twins:  # (one twin for a kernel that several modules import)
                    options = {key: value for key, value in kernel.targetoptions.items()
                               if key not in ("parallel", "nopython")}
                    twins[id(kernel)] = numba.njit(**options)(kernel.py_func)
                setattr(module, attribute, twins[id(kernel)])


os.register_at_fork(after_in_child=_serial_twins_in_forked_child)
