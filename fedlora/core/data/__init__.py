"""Data: sources, the tweets corpus, partitioners, federated splits, the token cache."""
