"""Online RL: algorithms (pure functions), rewards, rollouts on Ray Serve, weight sync."""
