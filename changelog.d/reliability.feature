The reliability suite (mixed load, hostile clients, byte dribble, backend faults, shutdown and reload under load) and atheris fuzz harnesses for every parser; results in docs/reliability.md.
