"""Storage: content-addressed tensors, atomic writes, memos, where files go, and the machine's disk."""
