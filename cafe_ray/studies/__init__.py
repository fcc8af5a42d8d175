"""Studies built from many simulations: method comparisons (``compare``), Ray Tune
sweeps (``sweep``) and the Ray Train centralized upper bound (``centralized``)."""
