"""The control plane a home runs for itself: the local Prefect server and worker that aif
manages, and the views of a start-up's runs (`aif status`, `aif runs ls`, `aif logs`)."""
