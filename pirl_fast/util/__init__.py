"""The base every stage may import: atomic files, progress bars, CPUs, signals, host reads, ranks."""
