"""The reload machine, in the operator's CLI: one swap from preflight to commit or rollback.

- reload  the phases of `hotswap reload`, driven through an injected Host
- host    Host, the one interface through which the machine reaches the OS (RealHost)
- repair  rollback and roll-forward of a swap interrupted on either side of its commit point
- lock    the reload lock and the instance lock
- drift   what a re-fork cannot apply, refused before anything forks
- probe   HTTP over the service's socket, as nginx or a health checker asks
"""
