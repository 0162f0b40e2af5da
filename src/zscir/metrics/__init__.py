"""Pure functional retrieval metrics: features and ids in, percent values out (no benchmark imports)."""
