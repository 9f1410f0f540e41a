"""Test suite (run with ./run_tests.sh)."""
