"""The Python API for notebooks and scripts: :func:`simulate` runs a config and returns a
:class:`Run`; :meth:`Run.load` reads any run directory back. Also reachable as
``cafe_ray.simulate`` and ``cafe_ray.Run``."""

from cafe_ray.api.run import Run
from cafe_ray.api.simulate import simulate

__all__ = ["Run", "simulate"]
