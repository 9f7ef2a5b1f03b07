"""The pruning engine: models, statistics, rankings, candidates, masks and reconstruction, and their cache identities."""
