"""tools/bench: pmfs benchmarks against reference file systems in the same run.

Modules:
    util       processes, mounts, caches, progress, machine facts
    systems    the file systems under test (pmfs and the references)
    workloads  the workloads (fio for I/O, timed os.* loops for metadata)
    report     the table and the JSON document
    profiling  cProfile windows inside the pmfs daemon, in-process core timings
    profwrap   runs the daemon with a cProfile window switched by SIGUSR1
    cli        the command line (tools/bench)
"""
