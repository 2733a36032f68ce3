"""One TLS manager for every listener: material loading and validation, atomic swaps, file watching."""
