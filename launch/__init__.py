"""Running many model pairs: sweeps, multi-host JAX on pods, job scripts.

Empty for now: the scale-out work builds here on jaxind.runner.run_pair and
jaxind.results.write_json (atomic, one JSON per pair).
"""
