"""The command line (`python -m addon`, `openai-usage-meter`): one module per command. Never imported by proxy/."""
