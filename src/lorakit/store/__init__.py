"""The adapter store: adapter folders, their metadata and model card, and the one loader of base + adapters."""
