"""The model: `ModelConfig`, the parameter table (`paramspec`), the Flax module and its layers (`model`, `moe`),
the symmetry group (`symmetry`), layer selections (`layers`) and a small trainer (`train`). Imports nothing above it
(docs/DESIGN.md §2)."""
