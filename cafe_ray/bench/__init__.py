"""Performance harness behind `cafe-ray bench` and benchmarks/ (ratios, not timed tests)."""
