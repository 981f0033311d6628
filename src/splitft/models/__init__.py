"""Per-architecture adapters that split a HF causal LM into client and server parts."""
