"""Hidden-state extraction spread over the processes of an `accelerate launch` (or `torchrun`).

Each process extracts a share of the models into the shared on-disk cache; the main process then
reads every model from the cache and assesses alone. A base and its LoRA adapters stay in one share
(the base is loaded once) unless processes would sit idle (`shares`); shares are balanced by weight
bytes times the models run on them.
Outside a launcher nothing here is used and accelerate is not initialised.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from mergekit_collapse._console import is_verbose
from mergekit_collapse._constants import launched
from mergekit_collapse.errors import EXIT_OK, EXIT_UNEXPECTED, BadInputError, CollapseError
from mergekit_collapse.guard.extract import extract
from mergekit_collapse.guard.forward import ExtractionSettings
from mergekit_collapse.models.loading import WEIGHT_SUFFIXES

__all__ = ["extract_shared", "is_main_process", "launch", "launched", "shares", "world"]


def world() -> Any:
    """accelerate's PartialState when launched on several processes, else None.

    Without CUDA it asks for the CPU (gloo): `accelerate launch --multi_gpu` on a CPU-only machine
    would otherwise leave each process believing it runs alone. The process group is destroyed at
    exit, while the interpreter is still whole: left to the interpreter's teardown, gloo's threads
    can abort the process ("terminate called without an active exception") and lose its output.
    """
    if not launched():
        return None
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    atexit.unregister(_close)  # once, however often world() is asked
    atexit.register(_close)
    return state


def _close() -> None:
    """Flush what this process printed, then destroy its process group (see `world`)."""
    import torch.distributed as dist

    sys.stdout.flush()
    sys.stderr.flush()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_launched(code: int | str | None) -> NoReturn:
    """End a launched process with `code` (a `SystemExit`'s: a message is printed, exit 1): run
    its exit handlers (`_close` among them) while the interpreter is
    whole, then leave without the interpreter's teardown. Objects that own threads (gloo's, the
    rendezvous store's) are destroyed in that teardown, and a thread destroyed unjoined aborts the
    process ("terminate called without an active exception"; the launcher then stops the other
    processes and their output is lost): destroying the process group at exit made it rare, not
    impossible (one of four CI runs on 2026-12-06, tests/guard/test_distributed.py)."""
    if isinstance(code, str):
        print(code, file=sys.stderr)
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else int(code is not None))


def is_main_process() -> bool:
    """True in a single-process run and in the main process of a launched one."""
    state = world()
    return state is None or state.is_main_process


def _weight_bytes(path: Any) -> int:
    """Bytes of the weight files of a local model folder (1 for a Hub id: its size is unknown)."""
    folder = Path(str(path.path)).expanduser()
    if not folder.is_dir():
        return 1
    sizes = [f.stat().st_size for f in folder.iterdir() if f.name.endswith(WEIGHT_SUFFIXES)]
    return max(sum(sizes), 1)


def shares(models: list[Any], n: int) -> list[list[Any]]:
    """Split model references into `n` shares, a base and its adapters together where possible.

    A group (one base folder with the adapters run on it) costs its base's weight bytes times
    (1 + its models): one load and one forward pass per model. While there are fewer groups than
    processes, the largest group is halved (each half loads the base once: 64 adapters of one base
    on 8 processes are 8 groups of 8). Groups go, largest first, to the lightest share.

    Returns:
        `n` lists of references (some empty when there are fewer models than processes), each in
        the models' order.
    """
    by_base: dict[tuple[str, str | None], list[Any]] = {}
    for ref in models:
        by_base.setdefault((str(ref.model.path), ref.model.revision), []).append(ref)
    groups = list(by_base.values())
    while len(groups) < n and max(map(len, groups), default=0) > 1:
        big = max(groups, key=len)
        groups.remove(big)
        groups += [big[: len(big) // 2], big[len(big) // 2:]]

    def cost(group: list[Any]) -> int:
        return _weight_bytes(group[0].model) * (1 + len(group))

    load, out = [0] * n, [[] for _ in range(n)]
    for group in sorted(groups, key=lambda g: -cost(g)):  # stable: ties keep the config's order
        i = load.index(min(load))
        load[i] += cost(group)
        out[i] += group
    order = {str(ref): i for i, ref in enumerate(models)}
    return [sorted(share, key=lambda r: order[str(r)]) for share in out]


def extract_shared(state: Any, models: list[Any], texts: list[str] | tuple[str, ...],
                   settings: ExtractionSettings, *, cache_dir: Path | None = None,
                   progress: bool = True,
                   labels: Mapping[str, str] | None = None) -> dict[str, int]:
    """Extract this process's share of `models` into the cache; wait for every process.

    Args:
        state: `world()`'s PartialState.
        models, texts, settings, cache_dir, labels: as `extract` takes them. On a GPU node a
            device of "auto" becomes this process's GPU (one GPU per process).
        progress: progress bars, shown by the main process only.

    Returns:
        Probes computed per model, over all processes (as `Extraction.computed`).

    Raises:
        The first error any process met (a CollapseError keeps its type and exit code; anything
        else is an unexpected error naming the process), on every process alike.
    """
    if settings.device == "auto":
        settings = replace(settings,
                           device=str(state.device) if state.device.type == "cuda" else "cpu")
    with state.split_between_processes(shares(models, state.num_processes)) as mine:
        share = mine[0]
    from accelerate.utils import gather_object

    computed, error = {}, None
    try:
        if share:
            computed = extract(share, texts, settings, cache_dir=cache_dir, labels=labels,
                               progress=progress and state.is_main_process).computed
    except Exception as e:  # noqa: BLE001 - told to every process, raised on each
        error = e
    # gather_object waits for everyone too; a process that failed says so instead of hanging
    outcomes = gather_object([(computed, None if error is None else (type(error), str(error)))])
    if error is not None:
        raise error
    for rank, (_, failed) in enumerate(outcomes):
        if failed is not None:
            kind, message = failed
            if issubclass(kind, CollapseError):  # each of ours takes the message first
                raise kind(message)
            raise RuntimeError(f"process {rank}: {kind.__name__}: {message}")
    return {name: n for done, _ in outcomes for name, n in done.items()}


def launch(argv: list[str], num_processes: int) -> int:
    """Run `python -m mergekit_collapse ARGV` on `num_processes` processes with accelerate.

    accelerate's `--multi_gpu` launcher (torchrun underneath): one GPU per process on a GPU node,
    gloo between CPU processes elsewhere (each with its share of the cores unless OMP_NUM_THREADS
    says otherwise); a free port is picked. The processes see the launcher's variables, so they
    do not launch again.

    Returns:
        The main process's exit status (1 when only another process failed).

    Raises:
        BadInputError: more processes than GPUs on a GPU node.
    """
    import torch
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    gpus = torch.cuda.device_count()
    if gpus and num_processes > gpus:
        raise BadInputError(f"--num-processes {num_processes} > the {gpus} GPU(s) here "
                            "(one GPU per process)")
    # the cores shared out (torchrun would give each process one thread)
    threads = (os.environ.get("OMP_NUM_THREADS")
               or str(max(1, (os.cpu_count() or 1) // num_processes)))
    # the main process prints the error itself; torchrun's "failed" line is noise
    if not is_verbose():
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = launch_command_parser().parse_args([
        "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
        "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--num_cpu_threads_per_process", threads, "-m", "mergekit_collapse", *argv])
    try:
        launch_command(args)
    except ChildFailedError as e:
        main = next((f.exitcode for rank, f in e.failures.items() if rank == 0), EXIT_OK)
        return main if main > 0 else EXIT_UNEXPECTED
    return EXIT_OK
