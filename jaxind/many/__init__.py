"""Many models: the model store, sweeps (config, run, summary), one-vs-many scans and the provenance report
(docs/DESIGN.md §2)."""
