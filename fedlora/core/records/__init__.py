"""What a run and a client keep on disk: the run directory and client state."""
