"""Training data: sources -> records -> formatted, tokenized examples with loss masks -> split, mixed, cached."""
