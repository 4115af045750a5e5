"""Helpers every layer may use: durable writes, text files, CPU threads, finiteness guards, progress bars."""
