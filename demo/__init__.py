"""`make demo` and the real peers it shares with the benchmarks and the network tests."""
