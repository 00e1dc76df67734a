"""Multi-run recipes built from ordinary runs (the top room below the CLI: it may import
bench, plan, train and everything below; nothing imports it). btx.py: Branch-Train-MiX."""
