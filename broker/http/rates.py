"""Message rates per topic, from the router's counters sampled once a second.

The hot path only counts (``Topic.messages_in`` / ``messages_out``); this
task turns the counts into rates for the JSON API and the dashboard, so no
timestamp is taken per publish.
"""

from __future__ import annotations

from collections import deque

import trio

from ..router import Router, Topic

SAMPLE_SECONDS = 1.0
#: Rates are averaged over about this many seconds.
WINDOW_SECONDS = 5.0


class RateSampler:
    def __init__(
        self, router: Router, interval: float = SAMPLE_SECONDS, window: float = WINDOW_SECONDS
    ) -> None:
        self.router = router
        self.interval = interval
        self._keep = max(2, int(window / interval) + 1)
        #: Per topic name: (time, messages_in, messages_out), oldest first.
        self._samples: dict[str, deque[tuple[float, int, int]]] = {}

    def sample(self) -> None:
        now = trio.current_time()
        for name, topic in self.router.topics.items():
            samples = self._samples.get(name)
            if samples is None:
                samples = self._samples[name] = deque(maxlen=self._keep)
            samples.append((now, topic.messages_in, topic.messages_out))

    def rates(self, topic: Topic) -> tuple[float, float]:
        """(messages in, messages out) per second over the recent window."""
        samples = self._samples.get(topic.name)
        if not samples:
            return 0.0, 0.0
        then, msgs_in, msgs_out = samples[0]
        elapsed = trio.current_time() - then
        if elapsed < self.interval / 2:
            return 0.0, 0.0
        return (topic.messages_in - msgs_in) / elapsed, (topic.messages_out - msgs_out) / elapsed

    async def run(self) -> None:
        while True:
            self.sample()
            await trio.sleep(self.interval)
