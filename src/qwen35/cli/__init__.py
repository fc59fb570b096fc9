"""The `qwen35` command line."""
