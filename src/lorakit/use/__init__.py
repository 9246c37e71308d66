"""Using adapters: generation, chat and evaluation."""
