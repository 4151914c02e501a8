"""fleetvm: short-lived sandbox VMs for user sessions, run by a fleet of workers."""

__version__ = "0.1.0"
