"""Teacher labels off the rollout's critical path (DAgger / AggreVaTe with an API teacher).

Why: DAgger and AggreVaTe ask the teacher for its action at EVERY visited state (paper Eq. 10-11), and in
the paper the teacher is a large model behind an API: hundreds of milliseconds a call. A label is only
read when the batch is packed, so waiting for it inside the engine's tick (the synchronous path) puts
the API's latency on every tick of every episode. :class:`LabelQueue` instead takes each state the moment
it exists, asks the teacher from a bounded pool of worker threads while the student keeps generating,
and hands back a ``Future`` the engine resolves before ``collect`` returns (the Trainer never sees a
pending label).

Only some teachers may be asked later and from another thread: the label must be a function of what the
agent saw, not of the live world. A policy declares that with the class attribute
``messages_only = True`` (see :func:`labels_deferrable`): its ``act`` reads only ``AgentState.messages``,
``.tools`` and ``.turn`` (never ``.env``), answers each state independently of the others in the call,
and retries transient failures itself. :class:`~unipost.rollout.openai_policy.OpenAIChatPolicy` does
(its retries with exponential backoff are the queue's retries: the queue adds no second layer). The
scripted expert reads the workspace, so its labels must be computed at the state, before the environment
steps; local models sample from a generator whose stream depends on call order and batch. Neither
declares the flag, and their labels stay synchronous.

Teacher-EXECUTED turns cannot wait: their action is the next thing the environment runs. They go through
the same queue as ``urgent`` requests, ahead of every queued label, so one bound covers all the
teacher's traffic and an executed turn never queues behind a backlog of labels.

Caching: one request per distinct state (messages, tools, turn) per queue, i.e. per ``collect``: the
samples of a GRPO-style group share their first state, and a state asked for twice (a label, then the
same state executed) costs one call. With a sampling teacher the states that share a key share one
sample, which is the label's definition (the teacher's action at that state) anyway.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import queue
import threading
import time
from concurrent.futures import Future
from typing import Any

from unipost.rollout.policy import AgentState, Policy, PolicyOutput

__all__ = ["LabelFailedError", "LabelQueue", "labels_deferrable", "state_key"]


class LabelFailedError(RuntimeError):
    """A deferred teacher label failed after the teacher's own retries.

    Raised by ``RolloutEngine.collect`` when the recipe's labels are required
    (``TeacherLabels(on_missing="error")``, the default). ``trajectories`` holds the episodes that
    finished with every label resolved; they were appended to the store before the error was raised,
    so a crashed collection loses only episodes still in flight or missing a label.
    """

    def __init__(self, message: str, trajectories: list[Any]):
        super().__init__(message)
        self.trajectories = trajectories


def labels_deferrable(policy: Any) -> bool:
    """True when ``policy`` declares ``messages_only = True``: its labels may be asked for later."""
    return getattr(policy, "messages_only", False) is True


def state_key(state: AgentState, greedy: bool) -> str:
    """What a messages-only teacher's answer depends on, as a short digest (the cache key)."""
    text = json.dumps(
        [state.messages, state.tools, state.turn, greedy], sort_keys=True, default=str, ensure_ascii=False
    )
    return hashlib.sha256(text.encode()).hexdigest()


_URGENT, _LABEL, _STOP = 0, 1, -1  # queue priorities: stop first, then executed turns, then labels


class LabelQueue:
    """Asks a messages-only teacher for actions from ``concurrency`` worker threads, cached per state.

    Args:
        teacher: a policy with ``messages_only = True`` (checked).
        concurrency: requests in flight at once (the worker threads); match the teacher's own bound
            (``OpenAIChatPolicy.concurrency``, its HTTP connection pool), or workers wait for a connection.
        greedy: passed to every ``teacher.act`` call (one collection decodes one way).

    Counters (read after the work): ``requests`` states actually sent to the teacher, ``cache_hits``
    requests answered by an earlier one, ``teacher_time_s`` summed time inside ``teacher.act``.
    """

    def __init__(self, teacher: Policy, *, concurrency: int, greedy: bool) -> None:
        if not labels_deferrable(teacher):
            raise ValueError(
                f"teacher {getattr(teacher, 'name', teacher)!r} does not declare messages_only = True: its "
                "labels may depend on the live environment and must be computed at the state"
            )
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"label concurrency must be an integer >= 1, got {concurrency!r}")
        self.teacher = teacher
        self.greedy = greedy
        self.requests = 0
        self.cache_hits = 0
        self.teacher_time_s = 0.0
        self._lock = threading.Lock()
        self._futures: dict[str, Future[PolicyOutput]] = {}
        self._states: dict[str, AgentState] = {}  # not yet started
        self._heap: queue.PriorityQueue[tuple[int, int, str | None]] = queue.PriorityQueue()
        self._seq = itertools.count()
        self._closed = False
        self._workers = [
            threading.Thread(target=self._work, name=f"unipost-label-{i}", daemon=True)
            for i in range(concurrency)
        ]
        for worker in self._workers:
            worker.start()

    def request(self, state: AgentState, *, urgent: bool = False) -> Future[PolicyOutput]:
        """The teacher's action at ``state``, as a future; the request is issued now (or reused).

        ``urgent`` (a teacher-executed turn the environment waits for) goes ahead of queued labels; a
        queued label of the same state is promoted rather than asked twice. A state whose last request
        failed or was cancelled is asked again.
        """
        key = state_key(state, self.greedy)
        with self._lock:
            if self._closed:
                raise RuntimeError("LabelQueue is closed")
            future = self._futures.get(key)
            # a cancelled request, or one that failed after the teacher's retries, is asked again, as the
            # synchronous path would; an answer (or one in flight) is shared
            failed = future is not None and future.done() and (future.cancelled() or future.exception())
            if future is not None and not failed:
                self.cache_hits += 1
                if urgent and key in self._states:  # still queued: a second, urgent entry jumps ahead
                    self._heap.put((_URGENT, next(self._seq), key))
                return future
            future = Future()
            self._futures[key] = future
            # the teacher never sees the environment: it may have stepped or closed by the time we ask
            self._states[key] = AgentState(list(state.messages), list(state.tools), None, state.turn)
            self._heap.put((_URGENT if urgent else _LABEL, next(self._seq), key))
            return future

    def cancel_pending(self, keep: set[Future[PolicyOutput]] | None = None) -> int:
        """Cancel queued (not started) requests whose future is not in ``keep``; returns how many."""
        keep = keep or set()
        cancelled = 0
        with self._lock:
            for key in list(self._states):
                future = self._futures[key]
                if future not in keep and future.cancel():
                    del self._states[key]
                    cancelled += 1
        return cancelled

    def close(self, *, wait: bool = True) -> None:
        """Cancel what is still queued and stop the workers (``wait``: until running requests end)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for key in list(self._states):
                self._futures[key].cancel()
            self._states.clear()
        for _ in self._workers:
            self._heap.put((_STOP, next(self._seq), None))
        if wait:
            for worker in self._workers:
                worker.join()

    def __enter__(self) -> LabelQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(wait=exc[0] is None)

    # -- internals --------------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            _, _, key = self._heap.get()
            if key is None:
                return
            with self._lock:
                state = self._states.pop(key, None)  # None: already started (promoted twin) or cancelled
                future = self._futures[key]
            if state is None or not future.set_running_or_notify_cancel():
                continue
            t0 = time.perf_counter()
            try:
                outs = list(self.teacher.act([state], greedy=self.greedy))
                if len(outs) != 1 or not isinstance(outs[0], PolicyOutput):
                    raise TypeError(
                        f"teacher {getattr(self.teacher, 'name', self.teacher)!r}.act returned {len(outs)} "
                        "items for 1 state; it must return one PolicyOutput per state"
                    )
            except BaseException as exc:  # the engine decides what a failed label means
                future.set_exception(exc)
            else:
                future.set_result(outs[0])
            finally:
                with self._lock:
                    self.requests += 1
                    self.teacher_time_s += time.perf_counter() - t0
