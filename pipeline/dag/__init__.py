"""The resource plan, the Ray Data DAG, the runner and the commit; nothing below imports it."""
