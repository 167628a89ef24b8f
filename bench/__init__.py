"""syncd benchmarks against the sandbox (see bench/README.md). Not part of the test suite."""
