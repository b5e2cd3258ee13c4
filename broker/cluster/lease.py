"""An etcd lease kept alive, and until when this process may rely on it.

etcd expires a lease by its leader's clock, counting the TTL from the
moment the leader renewed it. The renewal reached the leader after this
process sent it, so ``sent + TTL`` (by this process's monotonic clock) is
never later than etcd's expiry as long as the two clocks run at the same
rate; ``safe_until`` takes a margin off that for rate drift and for the
time between checking it and acting. An owner acknowledges writes only
while ``held()`` is true (docs/cluster.md, "Fencing"): a process paused past
its lease (SIGSTOP, a long GC pause, a cut-off network) wakes to find its
deadline passed and acknowledges nothing; its etcd writes are refused
anyway, because they compare the epoch of an owner key that is gone.
"""

from __future__ import annotations

import anyio

from .etcd import Etcd, EtcdError, LeaseNotFound


#: Pause between renewals while etcd does not answer.
RETRY_SECONDS = 0.25


class LeaseLost(Exception):
    """The lease can no longer be relied on (expired, revoked, or not
    renewed in time)."""


class LeaseKeeper:
    """Grants a lease and renews it every ``ttl / 3`` seconds in ``run``.

    ``safe_until`` is the monotonic time (``anyio.current_time()``) up to
    which the lease is certainly held; ``lost`` is set once it is not.
    """

    def __init__(self, etcd: Etcd, ttl: int, *, margin: float = 0.5) -> None:
        if ttl < 2:
            raise ValueError("an etcd lease needs a TTL of at least 2 seconds")
        self.etcd = etcd
        self.ttl = ttl
        self.margin = margin
        self.lease = 0
        self.granted_ttl = 0
        self.safe_until = 0.0
        self.lost = anyio.Event()
        self.renewals = 0

    def held(self) -> bool:
        """Whether the lease is certainly still held now."""
        return not self.lost.is_set() and anyio.current_time() < self.safe_until

    async def grant(self) -> int:
        sent = anyio.current_time()
        self.lease, self.granted_ttl = await self.etcd.grant(self.ttl)
        self.safe_until = sent + self.granted_ttl - self.margin
        return self.lease

    async def run(self) -> None:
        """Renew until cancelled; raise LeaseLost (and set ``lost``) when the
        lease is gone or could not be renewed before ``safe_until``."""
        if not self.lease:
            await self.grant()
        try:
            while True:
                renewed = self.renewals
                await anyio.sleep(self.granted_ttl / 3)
                await self._renew()
                while self.renewals == renewed:  # unreachable: try again soon, until the deadline
                    await anyio.sleep(RETRY_SECONDS)
                    await self._renew()
        finally:
            if not self.held():
                self.lost.set()

    async def _renew(self) -> None:
        sent = anyio.current_time()
        # A renewal that answers after safe_until is no use: the lease may
        # have lapsed meanwhile, so stop relying on it there and then.
        with anyio.move_on_after(max(0.0, self.safe_until - sent)) as scope:
            try:
                ttl = await self.etcd.keepalive(self.lease)
            except LeaseNotFound:
                self.lost.set()
                raise LeaseLost(f"lease {self.lease:x} expired or was revoked") from None
            except EtcdError:
                # Unreachable for now: try again while the deadline allows.
                if anyio.current_time() >= self.safe_until:
                    self.lost.set()
                    raise LeaseLost(f"lease {self.lease:x} not renewed before its deadline") from None
                return
        if scope.cancelled_caught:
            self.lost.set()
            raise LeaseLost(f"lease {self.lease:x} not renewed before its deadline")
        self.safe_until = max(self.safe_until, sent + ttl - self.margin)
        self.renewals += 1

    async def revoke(self) -> None:
        """Give the lease up (its keys go with it)."""
        self.lost.set()
        try:
            await self.etcd.revoke(self.lease)
        except LeaseNotFound:
            pass
