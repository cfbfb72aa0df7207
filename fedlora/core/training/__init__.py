"""Local training and evaluation loops, prompts and likelihood scores, fault injection."""
