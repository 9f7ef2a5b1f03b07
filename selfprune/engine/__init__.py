"""The engine: candidates, and the pruner and scorer that build and score them from the algorithms below, with their cache identities."""
