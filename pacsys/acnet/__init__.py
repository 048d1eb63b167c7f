"""ACNET names shared with the pacsys release (only its status numbers: see `pacsys.acnet.errors`)."""
