"""What travels between server and clients: message keys, client plans, reply checks, stop requests."""
