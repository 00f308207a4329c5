"""Test set-up: 8 simulated CPU devices for the sharding tests (set before jax loads), and
under pytest-xdist one worker for all of tests/suite_test.py."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()

try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # pytest without xdist: no scheduler to make
    LoadScopeScheduling = None

#: Modules whose tests one worker runs together: their module fixtures train the tiny
#: suite (20-40 s), which each worker would otherwise do again. (xdist's ``loadgroup``
#: would do this, but its marks do not reach the scheduler under pytest 9.)
_ONE_WORKER = ("tests/suite_test.py::",)


def pytest_collection_modifyitems(items):
    """`_ONE_WORKER` modules first: scheduled last, one worker would run them while the
    other has nothing left to do."""
    items.sort(key=lambda item: not item.nodeid.startswith(_ONE_WORKER))


if LoadScopeScheduling is not None:

    class _LoadWithOneWorkerModules(LoadScopeScheduling):
        """xdist's ``load`` (every test its own unit), except `_ONE_WORKER` modules."""

        def _split_scope(self, nodeid: str) -> str:
            return next((m for m in _ONE_WORKER if nodeid.startswith(m)), nodeid)

    def pytest_xdist_make_scheduler(config, log):
        return _LoadWithOneWorkerModules(config, log)
