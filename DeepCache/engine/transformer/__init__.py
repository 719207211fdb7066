"""The transformer family: its block stack, which blocks are wrapped, the patch."""
