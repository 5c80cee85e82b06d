"""SQL access analysis: which tables and columns a statement touches, and how."""
