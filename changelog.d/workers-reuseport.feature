With --workers on Linux, each worker gets a listening socket of its own (SO_REUSEPORT) for every tcp: listener, so new connections are spread evenly over the workers.
