"""Fuzzer for normcy's public functions (tests/fuzz/fuzz_engine.py; targets in fuzz_targets.py)."""
