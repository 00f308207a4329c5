"""Test set-up (XLA flags set before jax loads): 8 simulated CPU devices for the sharding
tests; XLA:CPU's LLVM back end at -O0; float32 matmuls at full precision; under
pytest-xdist one worker for all of tests/suite_test.py.

The tests' arrays are tiny and compiling is most of their time: -O0 takes a third off the
default run (12m47 -> 8m34 of pytest on 2 cores, one tree, one hour). It moves some results
by an ulp against XLA's default level; every bit-for-bit test compares two programs
compiled at the same level, and `io_streaming_test` repeats a sample of its bit-for-bit
sweep at the default level in a fresh process. ``MERGEJAX_TEST_XLA_OPT=default`` runs
everything as users compile."""

import os

#: The flag that sets XLA:CPU's LLVM optimisation level.
OPT_FLAG = "--xla_backend_optimization_level"


def _with_flag(flags: str, flag: str) -> str:
    """``flags`` plus ``flag`` (``--name=value``), unless ``--name`` is already set."""
    name = flag.split("=")[0]
    return flags if any(f.split("=")[0] == name for f in flags.split()) else f"{flags} {flag}"


_flags = _with_flag(os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8")
if os.environ.get("MERGEJAX_TEST_XLA_OPT") != "default":
    _flags = _with_flag(_flags, f"{OPT_FLAG}=0")
os.environ["XLA_FLAGS"] = _flags.strip()
# Float32 matmuls at full precision (XLA:GPU's default is TF32), so that the NumPy
# references hold on GPUs too for the models the tests run; merges pin it themselves
# (`mergejax.tree.full_precision`), which tests/engine_test.py checks.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

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
