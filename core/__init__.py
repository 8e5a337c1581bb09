"""ratebench.core: the lowest layer. Errors, the per-seed RNG, evaluation grids, run records, the
installed conf/ folder and the build of compiled steps; it imports nothing of ratebench above it."""
