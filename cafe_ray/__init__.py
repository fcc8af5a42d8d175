"""cafe-ray: a Ray-based simulation platform for personalized federated learning
with early-exit networks. Reference algorithm: CAFEDistill (arXiv:2601.10015)."""

__version__ = "0.1.0"
