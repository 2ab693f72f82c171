"""The run's configuration: frozen sections whose fields are their own flags."""
