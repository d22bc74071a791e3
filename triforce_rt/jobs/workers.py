"""`triforce batch --workers N`: the lines spread over N model replicas, Ray actors on this machine (a local
cluster started for the job) or on the cluster at --ray-address.

The driver reads the input and the output (resume and retry as without workers), hands out lines in chunks of
CHUNK x --batch-size, and alone appends the records, so they stay exactly-once: a record for an id already written
is dropped. A worker loads the model (the same flags) and runs each chunk as a local job would (batch.py:
generate_lines, continuous batching within the chunk), streaming each record back as its line ends. A worker that
dies (killed, out of memory, its machine gone) has its chunk's unfinished lines re-queued to the others; when
every worker is dead the job stops with the lines left, which a re-run resumes. Ray is an optional extra
(pip install 'triforce-rt[ray]'); remote workers need this package installed where they run.
"""
import logging
import os
import socket
import threading
from collections import deque

from ..errors import UserError, first_line
from ..scheduler import schedule_of
from .batch import Output, finished, generate_lines, pending, record

CHUNK = 4  # lines per hand-out, in batch sizes: enough to keep a worker's batch full, small enough to balance
CONNECT_TIMEOUT_S = 3.0


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--workers and --ray-address need Ray: pip install 'triforce-rt[ray]'") from None
    return ray


def check_address(address: str) -> None:
    """A cluster address (host:port) that answers within CONNECT_TIMEOUT_S, else a one-line error (ray.init
    would retry for a minute or more)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except (ValueError, OSError) as e:
        raise UserError(f"cannot reach the Ray cluster at {address} ({e.__class__.__name__}: {first_line(e)}); "
                        f"expected host:port of a running head node") from None


def worker_error(e: Exception) -> str:
    """The first line of what a worker raised (a UserError's message as it would print), not Ray's wrapping."""
    cause = getattr(e, "cause", None) or getattr(getattr(e, "error", None), "cause", None) or e
    return first_line(cause)


class BatchWorker:
    """One model replica (a Ray actor): loads the model from the job's parsed flags, then runs chunks."""

    def __init__(self, args):
        from ..cli import generation_config, load_models

        self.args = args
        self.cfg = generation_config(args)
        self.model, self.drafter = load_models(args)

    def pid(self) -> int:
        return os.getpid()

    def run(self, items: list):
        """Yield each item's record as its line ends (a generator: Ray streams the records to the driver). The
        scheduler reports records through a callback, so it runs in a thread and the records are passed on as
        they come."""
        a, records, done, error = self.args, [], threading.Event(), []

        def work():
            try:
                generate_lines(self.model, self.drafter, self.cfg, a.chat, items, schedule_of(a),
                               lambda rid, res: records.append(record(rid, res)))
            except BaseException as e:  # noqa: BLE001 (raised to the driver below)
                error.append(e)
            finally:
                done.set()

        threading.Thread(target=work, daemon=True).start()
        sent = 0
        while not done.wait(0.05) or sent < len(records):
            for rec in records[sent:]:  # (Ray's streaming generators do not take `yield from`)
                yield rec
            sent += len(records) - sent
        if error:
            raise error[0]


def run_workers(args, progress: bool) -> dict:
    """The batch job of args (cli's parsed flags) over args.workers Ray actors; returns the counts of run_batch."""
    ray = import_ray()
    if args.workers < 1:
        raise UserError(f"--workers must be at least 1 (got {args.workers})")
    schedule_of(args).check(args.offload in ("kv", "all"))
    if args.ray_address:
        check_address(args.ray_address)
    done = finished(args.out)
    if not args.ray_address:
        from ..models.loader import resolve

        resolve(args.model)  # a bad path is one line before any worker starts; a GGUF is converted once, here
        if not args.threads:  # the replicas share this machine's cores
            args.threads = max(1, (os.cpu_count() or 1) // args.workers)
    ray.init(address=args.ray_address, num_cpus=None if args.ray_address else max(args.workers, os.cpu_count() or 1),
             include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
             object_store_memory=None if args.ray_address else 100 * 2**20)
    try:
        # numba sizes its thread pool at import, and idle pool threads spin: each replica's pool is its --threads
        env = {"NUMBA_NUM_THREADS": str(args.threads)} if args.threads else {}
        actor = ray.remote(num_cpus=1, max_restarts=0, runtime_env={"env_vars": env})(BatchWorker)
        workers = [actor.remote(args) for _ in range(args.workers)]
        try:
            ray.get([w.pid.remote() for w in workers])  # each loaded its model
        except ray.exceptions.RayError as e:
            raise UserError(f"a Ray worker could not start: {worker_error(e)}") from None
        lines, items, counts = pending(args.input, args.out, done)
        with Output(args.out, len(lines), counts, progress) as out:
            Dispatch(ray, workers, items, CHUNK * args.batch_size, out).run()
    finally:
        ray.shutdown()
    return counts


class Dispatch:
    """Chunks of items to workers, one thread per worker; records written once each, lost chunks re-queued."""

    def __init__(self, ray, workers: list, items: list, chunk: int, out: Output):
        self.ray, self.workers, self.out = ray, workers, out
        self.queue = deque(items[i : i + chunk] for i in range(0, len(items), chunk))
        self.written, self.lock, self.failure = set(), threading.Lock(), None

    def run(self) -> None:
        threads = [threading.Thread(target=self.serve, args=(w,), daemon=True) for w in self.workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if self.failure:
            raise self.failure
        if self.queue:
            left = sum(map(len, self.queue))
            raise UserError(f"every Ray worker died; {left} lines have no record yet (run the same command again to "
                            f"resume)")

    def serve(self, worker) -> None:
        ray = self.ray
        while True:
            with self.lock:
                if not self.queue:
                    return
                chunk = self.queue.popleft()
            try:
                for ref in worker.run.options(num_returns="streaming").remote(chunk):
                    record = ray.get(ref)
                    with self.lock:
                        if record["id"] not in self.written:
                            self.written.add(record["id"])
                            self.out.write(record["id"], record)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError):
                with self.lock:
                    rest = [item for item in chunk if item[0] not in self.written]
                    if rest:
                        self.queue.appendleft(rest)
                return
            except ray.exceptions.RayTaskError as e:  # the worker raised: its chunk's lines left get error records
                with self.lock:
                    for rid, _, _ in chunk:
                        if rid not in self.written:
                            self.written.add(rid)
                            self.out.write(rid, f"worker error: {worker_error(e)}")
            except Exception as e:  # noqa: BLE001 (a driver-side failure: stop the job, records so far are kept)
                with self.lock:
                    self.failure = self.failure or e
                    self.queue.clear()
                return
