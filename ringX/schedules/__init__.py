"""The communication schedules, one module each; ringX.algorithms decides which one runs.

- broadcast:      owners in turn broadcast q or k/v; partials reduced to their owner (ringX1, ringX4)
- broadcast_pair: the broadcast schedules on two ranks, partials sent point to point
- paired:         point-to-point pairs at distances 1..N/2 (ringX2, causal)
- allgather:      all-gather k/v, reduce-scatter dk/dv (ringX3)
- solo:           a group of one rank: the plain kernel, no accumulators

A schedule talks to other ranks only through ringX.comm.GroupComm, and to the kernels only
through its RunContext (block plans, ringX.plan; block calls, ringX.execute).
"""
