"""Runtime plumbing every long-running process shares: typed settings, logging, the service loop."""
