"""The process's surroundings, which every stage may use: atomic files and free space (atomic.py),
progress bars, CPU cores per rank, stop signals, ranks and collectives (dist.py), the step's one
deliberate device-to-host read (host_read.py). Imports nothing else from pirl_fast."""
