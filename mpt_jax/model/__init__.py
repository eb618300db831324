"""The frozen T5 (our own linen module), its checkpoint loader and tokenizer."""
