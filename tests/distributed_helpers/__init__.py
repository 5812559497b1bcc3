"""Scripts the multiprocess tests (tests/test_distributed.py) launch as subprocesses."""
