"""A small job runner: independent jobs, one after another in this process or side by side on long-lived lanes.

A job is a plain dict: ``name`` (unique), optionally ``after`` (the name of a job it waits for: it starts only once
that one has finished, and is not run if that one failed) and ``cost`` (its estimated run time, any unit, used only
to order the jobs); anything else in it is for the job function. The job function, ``do(job, progress, on_step)``,
does one job: ``progress`` is a ``rich`` progress display (in a lane, a stand-in that forwards every call to the
parent's), ``on_step(n)`` says how many units of the overall bar the job has done so far. It must pickle by name (a
module-level function, or a ``package.module:attr`` string): a lane is a fresh spawned interpreter that imports it.

The runner knows nothing of what the jobs do; :mod:`distill.quickstart` runs a teacher's baselines and the students'
recipes with it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from distill.errors import DistillError

Job = dict[str, Any]
JobFunction = Callable[[Job, Any, Callable[[int], None]], None] | str  # a str: "package.module:attr"
Timings = dict[str, dict[str, float]]  # name: {"pid", "start", "end"} (time.time())


class JobsFailed(DistillError):
    """Some jobs failed after the others had finished; ``errors`` maps each failed job's name to why (its error,
    the exit code of the process that died under it, or the job it waited for that failed)."""

    def __init__(self, errors: dict[str, str]) -> None:
        self.errors = dict(errors)
        said = "\n".join(f"{name}: {msg.strip()}" for name, msg in self.errors.items())
        super().__init__(f"jobs failed: {', '.join(self.errors)}:\n{said}")


class LanesDidNotStart(DistillError):
    """A lane's process ended before it could take a job (``exitcode``); ``why`` says the likely cause. A fresh
    process would fail the same way, so the runner stops rather than start lane after lane."""

    def __init__(self, exitcode: int | None, why: str) -> None:
        self.exitcode, self.why = exitcode, why
        super().__init__(f"a job process ended with exit code {exitcode} before it started: {why}. Run the jobs from "
                         "a script saved to a file, or in this process (one lane).")


def lanes(jobs: int | None, pending: int, cores: int | None = None, cuda: bool | None = None) -> tuple[int, int]:
    """How many jobs run at once, and the torch threads each gets: ``(lanes, threads)``.

    On a CPU, one training process per core beats one process over all cores: this project's networks are small, so
    a step is many short parallel regions, and a second thread adds little to one process (about 1.25x on the
    digits UNet) while a second process on the other core adds more (the digits quickstart: 1.33x faster in all,
    ``docs/speed.md``). So ``None`` gives every core its own job (at most one per pending job) and splits the cores
    evenly; where CUDA is present the jobs would share one GPU, and it runs them one at a time. ``jobs`` asks for a
    number of lanes.
    """
    if jobs is not None and jobs < 1:
        raise DistillError(f"the number of jobs at once must be at least 1, got {jobs}; 1 runs the jobs one after "
                           "another in this process.")
    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    n = jobs if jobs is not None else (1 if cuda else cores)
    n = max(1, min(n, pending))
    return n, max(1, cores // n)


def makespan(order: list[Job], costs: Mapping[str, float], nlanes: int) -> float:
    """When the last job ends if ``nlanes`` lanes each take the first job of ``order`` they can start (one whose
    ``after`` has ended) as soon as they are free, each job taking ``costs[name]``: how :func:`run` runs them."""
    free = [0.0] * nlanes
    ends: dict[str, float] = {}
    pending = list(order)
    names = {j["name"] for j in order}
    while pending:
        lane = min(range(nlanes), key=free.__getitem__)
        now = free[lane]
        ready = [j for j in pending if j.get("after") not in names or ends.get(j["after"], float("inf")) <= now]
        if not ready:  # wait for the next job to end
            later = [t for t in ends.values() if t > now]
            free[lane] = min(later) if later else now
            if not later:  # nothing can free it: a job waits for one that never runs
                break
            continue
        job = ready[0]
        pending.remove(job)
        free[lane] = ends[job["name"]] = now + costs.get(job["name"], 0.0)
    return max(ends.values(), default=0.0)


def schedule(todo: list[Job], costs: Mapping[str, float], nlanes: int) -> list[Job]:
    """The order to hand ``todo`` to ``nlanes`` lanes: of every order of up to 7 jobs, the one that ends first by
    :func:`makespan` (ties: the longest jobs first); more jobs, the longest first, a job that others wait for
    counting their costs too. Past 7 jobs the search (8! orders and up) would cost more than it saves."""
    import itertools

    def chain(job: Job) -> float:
        return costs.get(job["name"], 0.0) + sum(costs.get(j["name"], 0.0) for j in todo
                                                 if j.get("after") == job["name"])

    longest = sorted(todo, key=lambda j: -chain(j))
    if len(todo) > 7:
        return longest
    best, best_t = longest, makespan(longest, costs, nlanes)
    for perm in itertools.permutations(longest):
        t = makespan(list(perm), costs, nlanes)
        if t < best_t - 1e-9:
            best, best_t = list(perm), t
    return best


def run(todo: list[Job], do: JobFunction, nlanes: int, threads: int, progress: Any, overall: Any, *,
        costs: Mapping[str, float] | None = None, steps: dict[str, int] | None = None,
        units: Mapping[str, int] | None = None, label: str = "jobs",
        blocked: str = "not run: it waits for {dep}, and {dep} failed") -> Timings:
    """Run ``todo`` with ``do`` and return when each job ran (``{name: {"pid", "start", "end"}}``).

    ``nlanes`` 1: one after another in this process, in the order given (a job after the one it waits for), and
    the first job that raises stops the run. More: on ``nlanes`` spawned processes with ``threads`` torch threads
    each, handed out in the order :func:`schedule` finds from ``costs`` (default: each job's ``cost``); a job that
    raises or whose process dies is reported once the others finished (:class:`JobsFailed`).

    ``progress`` is the ``rich`` Progress the jobs' bars go to, and ``overall`` its task that shows the whole run:
    its description says ``label`` and the running jobs, and it counts ``steps`` (units done so far, per job name;
    the caller's, updated in place, may hold jobs finished before) plus what the running jobs report. A job that
    returns in this process counts ``units[name]`` from then on (its full size even if it reported fewer: a
    resumed job may have had nothing left to do). ``blocked``: why a job whose ``after`` failed was not run
    (``{dep}``: that job).
    """
    steps = {} if steps is None else steps
    if nlanes == 1:
        return _run_here(todo, do, progress, overall, steps, units or {}, label)
    cost = costs if costs is not None else {j["name"]: float(j.get("cost", 0.0)) for j in todo}
    return _run_lanes(schedule(todo, cost, nlanes), do, nlanes, threads, progress, overall, steps, label, blocked)


def _resolve(do: JobFunction) -> Callable[[Job, Any, Callable[[int], None]], None]:
    if isinstance(do, str):
        from distill.plugins import load_object

        return load_object(do, "job function")
    return do


def _run_here(todo: list[Job], do: JobFunction, progress: Any, overall: Any, steps: dict[str, int],
              units: Mapping[str, int], label: str) -> Timings:
    """The jobs one after another in this process (one lane: where CUDA is present, or asked for)."""
    fn = _resolve(do)
    timings: Timings = {}
    for job in todo:
        start = time.time()
        progress.update(overall, description=f"{label}: {job['name']}")
        base = sum(steps.values())
        fn(job, progress, lambda s, at=base: progress.update(overall, completed=at + s))
        if job["name"] in units:
            steps[job["name"]] = units[job["name"]]
        timings[job["name"]] = {"pid": os.getpid(), "start": start, "end": time.time()}
    return timings


class _RemoteProgress:
    """What a job in a child process sees as its ``rich`` progress display: every call goes to the parent's."""

    disable = False

    def __init__(self, queue: Any, name: str) -> None:
        self.queue, self.name, self.tasks = queue, name, 0
        self.console = self

    def add_task(self, description: str, **fields: Any) -> int:
        self.tasks += 1
        self.queue.put(("add", self.name, (self.tasks, description, fields)))
        return self.tasks

    def update(self, task: int, **fields: Any) -> None:
        self.queue.put(("update", self.name, (task, fields)))

    def remove_task(self, task: int) -> None:
        self.queue.put(("remove", self.name, task))

    def print(self, *parts: Any, **_: Any) -> None:
        self.queue.put(("print", self.name, " ".join(map(str, parts))))


class _Outbox:
    """A lane's end of its own pipe to the parent, with ``put`` like a queue's. One channel per lane, written
    synchronously: a lane that dies mid-message (killed, out of memory, ``os._exit``) garbles only its own channel,
    which the parent then reads to its end. A ``multiprocessing.Queue`` shared by the lanes is not safe so: its
    writers share one lock and one pipe, and a process killed while its feeder thread held them left every other
    lane's reports stuck and the parent waiting for them forever."""

    def __init__(self, conn: Any) -> None:
        import threading

        self.conn, self.lock = conn, threading.Lock()

    def put(self, message: Any) -> None:
        with self.lock:
            self.conn.send(message)


def _worker(do: JobFunction, threads: int, inbox: Any, conn: Any) -> None:
    """A lane's long-lived child process (spawned: a fresh interpreter with ``threads`` torch threads): it runs the
    jobs the parent sends to ``inbox`` with ``do``, one after another until it gets ``None``, and reports through
    its own pipe ``conn`` (:class:`_Outbox`). One process per lane rather than per job: the interpreter, the
    imports and torch's start-up are paid once per lane (6 to 18 s a process on the 2-core machine, where a
    quickstart ``--fast`` job's work is 30 to 60 s; ``docs/speed.md``)."""
    import torch

    torch.set_num_threads(threads)
    queue = _Outbox(conn)
    me = f"pid {os.getpid()}"
    queue.put(("ready", me, os.getpid()))
    fn = None
    while True:
        job = inbox.get()
        if job is None:
            return
        name = job["name"]
        try:
            fn = fn or _resolve(do)  # resolved here, once: a failure to import it fails the job, not the lane
            fn(job, _RemoteProgress(queue, name), lambda s, n=name: queue.put(("step", n, s)))
        except KeyboardInterrupt:
            raise SystemExit(130) from None
        except BaseException as exc:  # the parent says what failed; this lane takes the next job
            import traceback

            msg = str(exc) if isinstance(exc, DistillError) else traceback.format_exc(limit=-3)
            queue.put(("error", name, msg))
        else:
            queue.put(("done", name, None))
        queue.put(("ready", me, os.getpid()))


def _run_lanes(order: list[Job], do: JobFunction, nlanes: int, threads: int, progress: Any, overall: Any,
               steps: dict[str, int], label: str, blocked: str) -> Timings:
    """Run the jobs on ``nlanes`` long-lived spawned processes (:func:`_worker`), each taking the next job in
    ``order`` when it is free, and show their bars in ``progress``. A job that raises is reported and its lane goes
    on; a lane whose process dies (killed, out of memory) fails the job it held and is replaced while jobs remain."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    ctx = mp.get_context("spawn")  # a fresh interpreter: no forked torch thread pools or locks
    channels: dict[int, Any] = {}  # pid: the reading end of that lane's own pipe (_Outbox)
    pending = list(order)
    waited_for = {j["name"] for j in order}  # jobs that run here: a job after one of them waits for its end
    done: set[str] = set()
    workers: dict[int, tuple[Any, Any]] = {}  # pid: (process, inbox)
    holding: dict[int, str | None] = {}  # pid: the job it runs (None: idle)
    idle: list[int] = []  # free lanes with nothing they can start yet
    started: set[int] = set()  # lanes that came up (said "ready" once)
    failed_start: int | None = None  # the exit code of a lane that died before it came up
    tasks: dict[tuple[str, int], Any] = {}
    errors: dict[str, str] = {}
    timings: Timings = {}
    # several processes share the cores: idle OpenMP threads must sleep, not spin (docs/speed.md); read by a child's
    # torch at its start, so set here, for the children only
    before = os.environ.get("OMP_WAIT_POLICY")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    def spawn() -> None:
        inbox = ctx.Queue()
        reader, writer = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_worker, args=(do, threads, inbox, writer), name=f"distill-{label}-lane")
        proc.start()
        writer.close()  # the lane holds the only writing end: when it ends, its channel reads to an end
        workers[proc.pid], holding[proc.pid] = (proc, inbox), None
        channels[proc.pid] = reader

    def ended(name: str) -> None:
        timings[name]["end"] = time.time()
        for key in [k for k in tasks if k[0] == name]:
            progress.remove_task(tasks.pop(key))

    def startable() -> Job | None:
        for job in list(pending):
            dep = job.get("after")
            if dep in errors:  # what it waits for failed: it cannot run
                pending.remove(job)
                errors[job["name"]] = blocked.format(dep=dep)
            elif dep is None or dep not in waited_for or dep in done:
                pending.remove(job)
                return job
        return None

    def dispatch(pid: int) -> None:  # a lane is free: give it the next job it can start, or let it go
        holding[pid] = None
        job = startable()
        if job is None and pending:
            idle.append(pid)  # jobs wait for others still running: keep the lane
            return
        workers[pid][1].put(job)
        if job is not None:
            holding[pid] = job["name"]
            timings[job["name"]] = {"pid": pid, "start": time.time()}

    def wake() -> None:  # a job ended: what waited for it may start now
        for pid in list(idle):
            idle.remove(pid)
            dispatch(pid)

    def handle(kind: str, name: str, body: Any) -> None:
        if kind == "ready":
            started.add(body)
            if body in workers:
                dispatch(body)
        elif kind == "add":
            i, description, fields = body
            shown = name if description in (name, "") else f"{name}: {description}"
            fields.setdefault("info", "")
            tasks[name, i] = progress.add_task(shown, **fields)
        elif kind == "update" and (name, body[0]) in tasks:
            progress.update(tasks[name, body[0]], **body[1])
        elif kind == "remove" and (name, body) in tasks:
            progress.remove_task(tasks.pop((name, body)))
        elif kind == "print":
            progress.console.print(f"{name}: {body}" if not body.startswith(name) else body)
        elif kind == "step":
            steps[name] = body
            progress.update(overall, completed=sum(steps.values()))
        elif kind in ("done", "error"):
            if kind == "error":
                errors[name] = body
            else:
                done.add(name)
            ended(name)
            wake()

    def receive(pid: int) -> None:  # everything the lane has said so far; its channel closes when the lane is gone
        conn = channels.get(pid)
        while conn is not None and conn.poll():
            try:
                message = conn.recv()
            except Exception:  # EOF: the lane ended, perhaps mid-message (the rest of that message is lost)
                conn.close()
                del channels[pid]
                return
            handle(*message)

    try:
        for _ in range(nlanes):
            spawn()
        while workers and failed_start is None:
            busy = [n for n in holding.values() if n is not None]
            progress.update(overall, description=f"{label}: {', '.join(busy) or 'starting'}")
            readable = wait(list(channels.values()), timeout=0.2)
            for pid in [p for p, c in channels.items() if c in readable]:
                receive(pid)
            for pid, (proc, _) in list(workers.items()):
                if proc.exitcode is None:
                    continue
                receive(pid)  # what it said before it ended
                proc.join()
                lost = holding.pop(pid, None)
                del workers[pid]
                if pid not in started:  # it could not even start: a fresh one would not either
                    failed_start = proc.exitcode
                    break
                if pid in idle:
                    idle.remove(pid)
                if lost is not None and lost not in errors and "end" not in timings[lost]:
                    errors[lost] = f"its process ended with exit code {proc.exitcode}"
                    ended(lost)
                    wake()
                if pending and len(workers) < nlanes:
                    spawn()  # a lane died with jobs left: a fresh one takes them
    finally:
        for proc, _ in workers.values():  # interrupted: stop the children (what they wrote stays for a resume)
            proc.terminate()
            proc.join()
        for conn in channels.values():
            conn.close()
        if before is None:
            os.environ.pop("OMP_WAIT_POLICY", None)
    if failed_start is not None:
        import sys

        main = getattr(sys.modules.get("__main__"), "__file__", None)
        why = (f"spawned processes re-import the script that started them, and {main!r} is not a file (Python read "
               "from stdin?)" if main is not None and not Path(main).is_file() else "see the error printed above")
        raise LanesDidNotStart(failed_start, why)
    if errors:
        raise JobsFailed(errors)
    return timings
