"""The statistics: p-values, LAP solvers, Grams, fingerprints and every test kernel (CSU/CSH, PERMTEST, MATCH,
localized, generalized, MoE), and the `TestResult` they return (docs/DESIGN.md §2)."""
