"""What carries a node's state to the others: the bus between nodes (``redisbus``)."""
