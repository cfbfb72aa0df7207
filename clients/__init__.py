"""The ClientApp and what runs on a client."""
