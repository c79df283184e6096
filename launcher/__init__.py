"""The ``distrib`` command: launch and supervise jobs, merge their metrics, plot reports.

Modules, one job each:

- ``cli``        argument parsing and the ``distrib`` entry point;
- ``launch``     ``distrib launch``: checks, placement, attempts and restarts, metrics merge;
- ``hosts``      where processes run: local, network namespace or ssh, and ``-H``/hostfile parsing;
- ``plan``       which process runs where, with which environment;
- ``ports``      free master ports, and checks of given ones;
- ``output``     rank-prefixed forwarding of every output line;
- ``supervisor`` spawning, watching and stopping the processes of one attempt (zmq transport);
- ``mpirun``     the same through Open MPI's ``mpiexec`` (``--transport mpi``);
- ``mpi_worker`` the tiny shim ``mpiexec`` runs, turning Open MPI variables into distrib's;
- ``merge``      per-rank metrics and timeline files merged into one CSV and one Chrome trace;
- ``report``     ``distrib report``: plots of loss and step time from metrics CSVs;
- ``cluster``    ``distrib cluster``: the network-namespace test cluster;
- ``errors``     :class:`LaunchError`, printed without a traceback (exit status 2).
"""
