"""Front-process side of the workers: one ``DeviceWorker`` per device.

Each DeviceWorker owns a worker process, a bounded queue of jobs and a dispatcher
task that sends one job at a time (one generation at a time per device). A reader
thread turns the worker's pipe messages into events on the job's asyncio queue.
A worker that dies fails its running job with UNAVAILABLE and is started again.
"""
from __future__ import annotations

import asyncio
import itertools
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ServiceError, status_from_name
from .logs import get_logger

_job_ids = itertools.count(1)
_log = get_logger(component="scheduler")


@dataclass
class Job:
    op: str
    payload: dict
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("started"|"tokens"|"done"|"error", data)
    id: int = field(default_factory=lambda: next(_job_ids))
    enqueued: float = field(default_factory=time.monotonic)
    dispatched: float | None = None
    cancelled: bool = False
    finished: bool = False
    peer: str = ""  # the caller's connection: its share of a full queue
    over: asyncio.Event = field(default_factory=asyncio.Event)  # set with the job's last event
    # Called with each event as it arrives, before it is queued: what must happen when the
    # device starts or stops (an energy window's edges) cannot wait for a handler that may be
    # blocked writing to a slow reader.
    watch: Callable[[str, Any], None] | None = None

    def post(self, kind: str, data) -> None:
        if self.watch is not None:
            try:
                self.watch(kind, data)
            except Exception:  # noqa: BLE001 - the event must still reach its handler and the dispatcher
                _log.exception("job_watch_failed", kind=kind)
        self.events.put_nowait((kind, data))

    def finish(self, kind: str, data) -> None:
        self.finished = True
        self.post(kind, data)
        self.over.set()


class QueueFull(Exception):
    pass


START_TRIES = 3  # failed restarts in a row after which queued jobs are refused and liveness fails


class DeviceWorker:
    """A device, its worker process and its queue."""

    def __init__(self, index: int, device: str, cuda_index: int | None, *, max_models: int, max_queue: int):
        self.index, self.device, self.cuda_index = index, device, cuda_index
        self.max_models, self.max_queue = max_models, max_queue
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        # Jobs in the queue that still count (its depth), oldest first: a cancelled or dispatched
        # one leaves at once, freeing its place.
        self._waiting_jobs: dict[int, Job] = {}
        self.state = "starting"
        self.capabilities: dict = {}
        self.current: Job | None = None
        # Told when a job is sent to the worker (its front-clock time) and when it is over
        # (None): the energy ledger must not book the device's time as idle meanwhile, even
        # before the job's window (a load's is known only once the load ends) is registered.
        self.on_busy: Callable[[float | None], None] | None = None
        self.exclusive = asyncio.Lock()  # held while a job runs; a baseline takes it to see an idle device
        self.restarts = 0
        self.start_failures = 0  # failed starts in a row since the last crash (0 once one succeeds)
        self.last_start_error = ""
        self._ctx = mp.get_context("spawn")
        self._cancel = self._ctx.RawValue("q", 0)
        self._proc = None
        self._conn = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hello: asyncio.Future | None = None
        self._dispatcher: asyncio.Task | None = None
        self.on_restart = None  # callback(index, exit code) after a crash: the front's cache mirror, logs
        self.on_start_failed = None  # callback(index, tries, error) when a restart fails: logs, health
        self.on_ready = None  # callback(index) when a restarted worker is ready: health

    # -- process lifecycle -------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._spawn()
        self._dispatcher = asyncio.create_task(self._dispatch(), name=f"dispatch-{self.index}")

    async def _spawn(self) -> None:
        from .worker import worker_main

        parent, child = self._ctx.Pipe()
        self._conn = parent
        self._hello = self._loop.create_future()
        self._proc = self._ctx.Process(
            target=worker_main, args=(child, self.device, self.cuda_index, self._cancel, self.max_models),
            name=f"llem-worker-{self.index}", daemon=True,
        )
        self._proc.start()
        child.close()
        threading.Thread(target=self._reader, args=(parent, self._proc), daemon=True,
                         name=f"llem-reader-{self.index}").start()
        hello = await self._hello
        self.capabilities = hello["capabilities"]
        if self.state != "stopped":  # stop() during the start: the new process got its "stop"
            self.state = "ready"

    def _reader(self, conn, proc) -> None:
        """Runs in a thread: pipe messages → event loop."""
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break
            self._post(self._on_message, msg)
        proc.join(timeout=5)
        self._post(self._on_exit, proc)

    def _post(self, fn, arg) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:  # the loop closed: the server has stopped, nobody is listening
            pass

    def _on_message(self, msg: dict) -> None:
        if msg["type"] == "hello":
            if self._hello and not self._hello.done():
                self._hello.set_result(msg)
            return
        job = self.current
        if job is None or job.id != msg.get("job"):
            return
        if msg["type"] == "started":
            job.post("started", msg["t"])
        elif msg["type"] == "loaded":
            job.post("loaded", msg["result"])
        elif msg["type"] == "tokens":
            job.post("tokens", msg["items"])
        elif msg["type"] in ("done", "error"):
            job.finish(msg["type"], msg["result"] if msg["type"] == "done" else msg)

    def _on_exit(self, proc) -> None:
        if self.state == "stopped":
            return
        if self._hello is not None and not self._hello.done():
            # Died before saying hello: a broken install or device, not a crash mid-request.
            self._hello.set_exception(RuntimeError(
                f"the worker process for device {self.device} exited during start-up (exit code {proc.exitcode})"))
            return
        job = self.current
        if job is not None and not job.finished:
            job.finish("error", {
                "status": "UNAVAILABLE", "retryable": True, "reason": "WORKER_RESTARTED",
                "message": f"the worker process for device {self.device} died (exit code {proc.exitcode}) "
                           "while running this request; it is being restarted, retry the request",
            })
        self.state = "restarting"
        self.restarts += 1
        if self.on_restart:
            self.on_restart(self.index, proc.exitcode)
        asyncio.ensure_future(self._restart())

    async def _restart(self) -> None:
        """Start a new worker, retrying with back-off (1, 2, 4 … 30 s) rather than take the
        server down; each failure is reported, and queued jobs fail after START_TRIES."""
        delay = 1.0
        while self.state != "stopped":
            try:
                await self._spawn()
            except Exception as exc:  # noqa: BLE001 - a broken install or a lost device
                if self.state == "stopped":
                    return
                self.start_failures += 1
                self.last_start_error = str(exc)
                if self.on_start_failed:
                    self.on_start_failed(self.index, self.start_failures, exc)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 30.0)
                continue
            if self.state == "ready":
                self.start_failures, self.last_start_error = 0, ""
                if self.on_ready:
                    self.on_ready(self.index)
            return

    async def stop(self) -> None:
        self.state = "stopped"
        if self._dispatcher:
            self._dispatcher.cancel()
        try:
            self._conn.send({"op": "stop"})
        except Exception:  # noqa: BLE001
            pass
        if self._proc is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._proc.join, 10)
            if self._proc.is_alive():
                self._proc.kill()

    def kill(self) -> None:
        """Kill the worker process (tests: a crash mid-request)."""
        if self._proc is not None:
            self._proc.kill()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    # -- jobs ----------------------------------------------------------------
    def submit(self, op: str, payload: dict, peer: str = "") -> Job:
        """Queue a job or raise QueueFull; the caller awaits ``job.events``.

        A full queue is shared fairly between connections: a caller holding fewer places than
        another by two or more takes the newest place of the one holding most (that job is
        answered QUEUE_FULL with RetryInfo). Without this, a client retrying at once kept
        every place and one honouring RetryInfo never got in."""
        if len(self._waiting_jobs) >= self.max_queue:
            victim, held = self._fair_share_victim(peer)
            if victim is None:
                raise QueueFull(f"device {self.device} has {len(self._waiting_jobs)} requests waiting "
                                f"(limit {self.max_queue})")
            # Finished, not cancelled: its handler then releases the model it held (a cancelled
            # job's release is left to the handler's background clean-up, which this one has not).
            self._unwait(victim)
            victim.finish("error", {
                "status": "RESOURCE_EXHAUSTED", "retryable": True, "reason": "QUEUE_FULL",
                "message": f"pushed out of device {self.device}'s full queue (limit {self.max_queue}) by another "
                           f"caller: this connection held {held} of the places; retry"})
        job = Job(op, payload, peer=peer)
        self._waiting_jobs[job.id] = job
        self.queue.put_nowait(job)
        return job

    def _fair_share_victim(self, peer: str) -> tuple[Job | None, int]:
        """The newest job of the connection holding most places, and how many it holds, where
        that is two more than ``peer`` holds; else (None, 0)."""
        counts: dict[str, int] = {}
        for j in self._waiting_jobs.values():
            counts[j.peer] = counts.get(j.peer, 0) + 1
        top = max(counts, key=counts.get, default=None)
        if top is None or top == peer or counts[top] < counts.get(peer, 0) + 2:
            return None, 0
        return [j for j in self._waiting_jobs.values() if j.peer == top][-1], counts[top]

    def _unwait(self, job: Job) -> None:
        self._waiting_jobs.pop(job.id, None)

    def cancel(self, job: Job) -> None:
        """Stop a job: skipped if still queued, stopped within one decode step if running."""
        job.cancelled = True
        if job.finished:
            return
        if self.current is job:
            self._cancel.value = job.id
        elif job.dispatched is None:
            # Still queued: the dispatcher will skip it; end it now so nothing waits for it,
            # and give its place in the queue to the next caller.
            self._unwait(job)
            job.finish("error", {"status": "CANCELLED", "message": "cancelled before it reached the device"})

    def queue_depth(self) -> int:
        return len(self._waiting_jobs)

    async def _dispatch(self) -> None:
        while True:
            job = await self.queue.get()
            if job.cancelled or job.finished:  # cancelled, or pushed out of a full queue
                continue
            self._unwait(job)
            async with self.exclusive:
                while self.state != "ready" and self.start_failures < START_TRIES:
                    await asyncio.sleep(0.05)
                if job.cancelled or job.finished:  # its caller gave up while the worker restarted
                    continue
                if self.state != "ready":
                    # Restarts keep failing (a lost GPU, a broken install): answer, do not hang.
                    job.finish("error", {
                        "status": "UNAVAILABLE", "retryable": True, "reason": "WORKER_RESTARTED",
                        "message": f"the worker process for device {self.device} cannot start "
                                   f"({self.start_failures} tries; last: {self.last_start_error}); retry later"})
                    continue
                self.current = job
                job.dispatched = time.monotonic()
                self._busy(job.dispatched)
                try:
                    try:
                        self._conn.send({"op": job.op, "job": job.id, **job.payload})
                    except Exception as exc:  # noqa: BLE001 - broken pipe: the reader sees the exit
                        job.finish("error", {"status": "UNAVAILABLE", "retryable": True, "reason": "WORKER_RESTARTED",
                                             "message": f"worker unreachable: {exc}"})
                    # One job at a time: the next is sent once this one's last message arrived.
                    await job.over.wait()
                finally:
                    self.current = None
                    self._busy(None)

    def _busy(self, since: float | None) -> None:
        if self.on_busy is not None:
            try:
                self.on_busy(since)
            except Exception:  # noqa: BLE001 - bookkeeping must never stop the device's queue
                _log.exception("on_busy_failed")


def error_from_worker(msg: dict) -> ServiceError:
    return ServiceError(status_from_name(msg.get("status", "INTERNAL")), msg.get("message", "worker error"),
                        violations=[tuple(v) for v in msg.get("violations", ())],
                        retry_delay_s=1.0 if msg.get("retryable") else None, reason=msg.get("reason"))

