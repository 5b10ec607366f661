"""Claims data: vocabulary, on-disk layout, simulator, validation and streaming input."""
