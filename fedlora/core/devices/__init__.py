"""Device and network profiles of the clients, and the virtual clock built on them."""
