"""The micro-batcher behind `bertcache serve`: concurrent requests gathered into one encoder call.

Requests wait for company up to `max_wait_ms`, within a budget of texts and (estimated) tokens; the
gathered call runs on one worker thread, so the event loop keeps accepting requests and torch is
never entered from two threads at once. Each request gets its own slice of the results back.
"""
import asyncio
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

# How long a micro-batch waits for company, by device (docs: serving): on a CPU the encoder is the
# busy part and a wait only idles it; on a GPU a call's fixed cost (Python, kernel launches)
# dominates, and waiting for bigger calls pays.
MAX_WAIT_MS = {"cpu": 1.0, "gpu": 5.0}
MAX_BATCH_TEXTS = 256      # texts per gathered call to the encoder (which cuts it into batch_tokens batches)
MAX_BATCH_TOKENS = 16384   # tokens (estimated from characters) per gathered call


@dataclass
class _Job:
    texts: list
    tokens: int
    future: asyncio.Future
    arrived: float


class MicroBatcher:
    """Runs `predict_proba(texts)` on one worker thread, gathering concurrent calls; its result (an array,
    or a dict of arrays, one row per text) is cut back into each request's rows.

    With `batching=False` every request is its own call (the same thread, for a fair comparison).
    A gathered call holds at most `max_batch_texts` texts and `max_batch_tokens` tokens (estimated
    from characters), except that a single request is never split.
    """

    def __init__(self, predict_proba, estimate_tokens, *, batching: bool = True,
                 max_wait_ms: float = MAX_WAIT_MS["cpu"],
                 max_batch_texts: int = MAX_BATCH_TEXTS, max_batch_tokens: int = MAX_BATCH_TOKENS):
        self._predict = predict_proba
        self._estimate = estimate_tokens
        self.batching = batching
        self.max_wait = max_wait_ms / 1000
        self.max_batch_texts = max_batch_texts
        self.max_batch_tokens = max_batch_tokens
        self.stats = {"requests": 0, "texts": 0, "encoder_calls": 0, "largest_call": 0}
        self._pending: deque = deque()
        self._executor = self._task = self._wakeup = self._loop = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bertcache-encoder")
        if self.batching:
            self._wakeup = asyncio.Event()
            self._task = asyncio.create_task(self._gather_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._executor = self._task = self._wakeup = self._loop = None

    async def _started(self):
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # First use without the app's lifespan, or a new event loop (TestClient without `with`): the
            # old loop's task and waiters cannot be awaited from this one, so they are dropped.
            self._pending.clear()
            await self.start()
        return loop

    async def run_alone(self, fn, texts: list):
        """`fn(texts)` as a call of its own on the worker thread, in turn with the gathered calls (what they
        cannot hold, e.g. a pair head's single texts for /embed): the encoder is still entered from one thread."""
        self.stats["requests"] += 1
        self.stats["texts"] += len(texts)
        self._count_call(len(texts))
        return await self.call(fn, texts)

    async def call(self, fn, *args):
        """`fn(*args)` on the worker thread, in turn with the encoder's calls, counted nowhere (e.g. the token
        count of /v1/embeddings' usage: a fast tokenizer may not be entered from two threads at once)."""
        loop = await self._started()
        return await loop.run_in_executor(self._executor, fn, *args)

    async def predict_proba(self, texts: list):
        if not self.batching:
            return await self.run_alone(self._predict, texts)
        loop = await self._started()
        self.stats["requests"] += 1
        self.stats["texts"] += len(texts)
        job = _Job(texts, sum(self._estimate(t) for t in texts), loop.create_future(), loop.time())
        self._pending.append(job)
        self._wakeup.set()
        return await job.future

    def _count_call(self, n: int) -> None:
        self.stats["encoder_calls"] += 1
        self.stats["largest_call"] = max(self.stats["largest_call"], n)

    def _full(self) -> bool:
        texts = tokens = 0
        for job in self._pending:
            texts += len(job.texts)
            tokens += job.tokens
            if texts >= self.max_batch_texts or tokens >= self.max_batch_tokens:
                return True
        return False

    def _take(self) -> list:
        """The oldest pending jobs that fit the budget (always at least one); cancelled ones are dropped."""
        jobs, texts, tokens = [], 0, 0
        while self._pending:
            job = self._pending[0]
            if job.future.done():  # the client went away
                self._pending.popleft()
                continue
            if jobs and (texts + len(job.texts) > self.max_batch_texts
                         or tokens + job.tokens > self.max_batch_tokens):
                break
            jobs.append(self._pending.popleft())
            texts += len(job.texts)
            tokens += job.tokens
        return jobs

    async def _gather_forever(self) -> None:
        loop = asyncio.get_running_loop()
        free_since = 0.0  # when the encoder last finished a call
        while True:
            await self._wakeup.wait()
            # Wait for company up to max_wait after the oldest request came in or the encoder came free,
            # whichever is later: the clients just answered get that long to send their next request,
            # so a steady load does not split into groups that take turns. A full budget stops the wait.
            while self._pending and not self._full():
                delay = max(self._pending[0].arrived, free_since) + self.max_wait - loop.time()
                if delay <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), delay)
                except asyncio.TimeoutError:
                    break
            jobs = self._take()
            if self._pending:
                self._wakeup.set()
            else:
                self._wakeup.clear()
            if not jobs:
                continue
            texts = [t for job in jobs for t in job.texts]
            self._count_call(len(texts))
            try:
                probs = await loop.run_in_executor(self._executor, self._predict, texts)
            except (Exception, asyncio.CancelledError) as e:
                # The encoder failed (or the server is stopping): every request of this call gets the error.
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(e if isinstance(e, Exception)
                                                 else RuntimeError("the server is shutting down"))
                if isinstance(e, asyncio.CancelledError):
                    raise
                continue
            finally:
                free_since = loop.time()
            start = 0
            for job in jobs:
                if not job.future.done():
                    job.future.set_result(_rows(probs, start, start + len(job.texts)))
                start += len(job.texts)


def _rows(result, start: int, stop: int):
    """Rows start:stop of a call's result: an array, or a dict of arrays (Predictor.run)."""
    if isinstance(result, dict):
        return {k: v[start:stop] for k, v in result.items()}
    return result[start:stop]
