"""lensfeed performance benchmarks: ``python -m benchmarks.run [--quick]`` (see README.md)."""
