"""What reads and writes: model assets on disk (`assets`), tokenizers, token batches (`data`), HF configs
(`hf_config`), the content-addressed cache (`store`), atomic outputs (`destinations`), the compilation cache
(`caching`) and a loaded model (`loading.Model`). Checkpoint readers live in the top-level `converters` package
(docs/DESIGN.md §2)."""
