"""What the test modules share: helpers here, fixtures in tests/conftest.py.

A test module imports these as ``from helpers.raw import RawClient``, never
from another test module. That works because tests/ has no
``__init__.py``: pytest (its default "prepend" import mode) puts tests/ on
sys.path, so ``helpers`` is a top-level package there. Inside the package,
modules import each other relatively (``from .frames import ...``).

One module per thing owned:

- ``frames``: frames built by hand, byte for byte (they can lie).
- ``raw``: raw protocol peers (TCP, the client-side codec reading).
- ``cases``, ``strategies``: sample events of every frame type and the
  round-trip cases; Hypothesis strategies for events.
- ``fuzzing``: the broker fuzzers' seeded frame generators and their
  well-behaved client.
- ``brokerlog``: the in-process broker's log, failing on errors.
- ``inproc``: an in-process broker's sessions, and bounded polling of what
  no event announces.
- ``restarts``: a broker served until an event (stopped and started again
  on one port), a free port, the reconnect tests' quick retry policy.
- ``procs``: ``pybroker`` subprocesses (one-shot runs, ``serve``, a broker
  killed and restarted on the same data directory).
- ``http``: HTTP requests to the broker's HTTP side.
- ``collect``: receiving messages (``take``, ``take_until``, ``Collector``).
- ``logs``: the file log read and damaged directly (``walk``, ``flip_byte``).
- ``faults``: ``FaultyOps``, the file-call shim that fails like a disk.
- ``fakes``: test doubles for the group logic (sessions, router events).
- ``auth``: users files; ``certs``: TLS certificates from a test CA.
- ``anybroker``: an in-process broker under Trio or asyncio; ``browser``:
  Playwright for the dashboard tests; ``modules``, ``stored``: the
  package's modules, and stored batches read back.
- ``cluster``: etcd and SeaweedFS servers on loopback (cluster tests).
- ``celery_app``, ``dramatiq_app``, ``taskworkers``: Celery and Dramatiq
  apps on pybroker and their worker subprocesses; ``readme``: README
  sections and code blocks.
"""
