"""Pruning methods as tensor math: structured rankings (Wanda-sp), unstructured masks, slicing, and the methods registry."""
