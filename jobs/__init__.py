"""Entry points (`python -m jobs.<name>`) and the pieces they share: config, tracking, checkpoints."""
