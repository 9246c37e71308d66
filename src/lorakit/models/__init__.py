"""Base models: references, the embedded model, architecture and target modules, tokenizer, loading."""
