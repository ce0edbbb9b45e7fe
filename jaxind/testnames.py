"""The names of the tests the runner knows (kept free of heavy imports: the CLI validates
``--tests`` before it loads JAX)."""

ALL_TESTS = ("csu", "csu_all", "csh", "l2", "mc", "jsd", "match", "generalized")
DEFAULT_TESTS = ("csu", "l2", "jsd", "match")
