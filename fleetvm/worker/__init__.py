"""The worker node: runs the VM tasks of its own queue, reaps expired VMs."""
