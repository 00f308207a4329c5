"""absl binaries: the benchmark suite and the benchmark scripts.

Importing the package (``python -m experiments.X`` does, before ``X`` loads NumPy or JAX)
limits OpenBLAS to one thread unless the environment says otherwise: XLA:CPU already runs
independent LAPACK calls (jaxlib's CPU SVD/eigh go through SciPy's OpenBLAS) concurrently,
and letting each start its own OpenBLAS threads oversubscribed the cores (a whole-tree Iso-C
took 31.9 s instead of 10.9 s on a 2-core machine, notes/refs_spectral_a.md).
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
