"""Extra sinks (TensorBoard, W&B, MLflow ...) each on their own thread."""
from __future__ import annotations

import collections
import threading
import weakref

SINK_QUEUE = 256                     # batches waiting per sink; beyond it the sink's rows are dropped


class _SinkWorker:
    """One extra sink on its own thread with a bounded queue: a slow or hung sink loses its
    own rows (counted), never the store's."""

    def __init__(self, sink, recorder):
        self.sink = sink
        self.name = getattr(sink, "name", type(sink).__name__)
        self._rec = weakref.proxy(recorder)
        self._q: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._closed = False
        self.thread = threading.Thread(target=self._loop, name=f"gradguard-sink-{self.name}", daemon=True)
        self.thread.start()

    def put(self, method: str, *args) -> None:
        with self._cv:
            if self._closed:
                return
            if len(self._q) >= SINK_QUEUE:
                lost = len(args[0]) if method == "write_steps" else 0
                self._rec._fail(self.name, RuntimeError(f"sink is not keeping up; {lost} rows not sent to it"))
                return
            self._q.append((method, args))
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._q.append(("close", ()))
            self._cv.notify()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._q:
                    self._cv.wait()
                method, args = self._q.popleft()
            fn = getattr(self.sink, method, None)
            if fn is not None:
                try:
                    fn(*args)
                except Exception as e:
                    try:
                        self._rec._fail(self.name, e)
                    except ReferenceError:
                        pass
            if method == "close":
                return


