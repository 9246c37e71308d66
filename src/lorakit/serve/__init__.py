"""`lorakit serve`: the adapter store behind one OpenAI-compatible endpoint."""
