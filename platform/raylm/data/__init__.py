"""Ray Data operators: filters, dedup, tokenization."""
