"""The distillation group: ranks 0..D share the server's distillation (`distill.ranks = D`).

docs/design.md "Distillation over a group of ranks". Distillation splits by
teacher: each teacher's forward pass, its L_bn term and its KD batch are
independent, so each group rank evaluates the teachers it owns and the group
sums what the teachers contribute, in rank order:

- synthesis, per generator step: the loss terms (3 scalars, so every rank makes
  the same outlier-filter decisions), then the gradients of the fast generator,
  z and the class embeddings;
- FedRevive's KD, per iteration: the student's gradient and loss;
- FedEcho, per KD iteration: the teachers' logits (each rank fills the rows of
  its own teachers), then the student's gradient and loss over its share of
  the batch rows.

Everything else is replicated: the generator, the student, their optimizers,
the pool and the random streams are identical on every group rank, because
every rank takes the same steps with the same reduced gradients and draws the
same random numbers (each rank draws every teacher's batch and keeps its own).
The sum is an all-gather followed by a local sum in rank order, not
MPI_Allreduce, whose order the MPI standard leaves open: so a fixed D gives
the same results for any number of worker ranks.

`Solo` is the group of D = 0: its reductions return their inputs untouched and
never yield, so the single-rank path is the computation it always was.

The reductions are generators: while the group has not answered they yield
`WAIT`, and the caller decides how to wait (rank 0's server polls its workers
and sleeps with back-off; a member only sleeps). Rank 0 tells the members what
to compute with `call` (a pickled message per member; the teacher models a
member owns travel with the first call after they enter the buffer), and
`serve` is the members' loop.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence

import numpy as np
import torch

WAIT = "wait"           # yielded by a reduction whose result has not arrived yet
TAG_CALL = 31           # rank 0 -> member: a pickled command


class Solo:
    """The group of one rank (distill.ranks = 0): every teacher is rank 0's, reductions are the identity."""

    size, rank = 1, 0

    def reduce(self, parts: Sequence[torch.Tensor]) -> Generator[str, None, list[torch.Tensor]]:
        return list(parts)
        yield  # a generator that never yields

    def rows(self, n: int) -> slice:
        """This rank's share of n batch rows: all of them."""
        return slice(0, n)

    def stop(self) -> None:
        """End the members' loops (there are none)."""


class Group(Solo):
    """Ranks 0..D of the run on their own communicator (a `comm.Split` of the world)."""

    def __init__(self, comm):
        self.comm = comm
        self.size, self.rank = comm.Get_size(), comm.Get_rank()
        self.sending: list = []    # rank 0: requests of calls in flight (their pickles stay alive with them)

    def reduce(self, parts: Sequence[torch.Tensor]) -> Generator[str, None, list[torch.Tensor]]:
        """Sum each tensor of `parts` over the group, in rank order (float32; shapes as given)."""
        from mpi4py import MPI
        flat = torch.cat([p.detach().reshape(-1).to("cpu", torch.float32) for p in parts]).numpy()
        gathered = np.empty((self.size, flat.size), dtype=np.float32)
        request = self.comm.Iallgather([flat, MPI.FLOAT], [gathered, MPI.FLOAT])
        while not request.Test():
            yield WAIT
        total = torch.from_numpy(gathered[0].copy())
        for r in range(1, self.size):   # a fixed order: the same bits on every rank and in every run
            total += torch.from_numpy(gathered[r])
        out, offset = [], 0
        for p in parts:
            out.append(total[offset:offset + p.numel()].view(p.shape).to(p.device))
            offset += p.numel()
        return out

    def rows(self, n: int) -> slice:
        """This rank's contiguous share of n batch rows (the first n % size ranks take one more)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    # -- rank 0 ----------------------------------------------------------------

    def call(self, message_for: Callable[[int], dict]) -> None:
        """Send every member its command `message_for(member)` (nonblocking; completed later)."""
        self._reap()
        for member in range(1, self.size):
            self.sending.append(self.comm.isend(message_for(member), dest=member, tag=TAG_CALL))

    def stop(self) -> None:
        """End the members' loops and wait until every command has been delivered."""
        from ..transport.mpi import wait
        self.call(lambda member: {"kind": "stop"})
        for request in self.sending:
            wait(request)
        self.sending.clear()

    def _reap(self) -> None:
        self.sending = [r for r in self.sending if not r.Test()]

    # -- members ---------------------------------------------------------------

    def receive(self) -> dict:
        """The next command from rank 0 (sleeping with back-off while none is there)."""
        from ..transport.backoff import Backoff
        backoff = Backoff()
        while (message := self.comm.improbe(source=0, tag=TAG_CALL)) is None:
            backoff.idle()
        return message.recv()


def drive(work: Generator) -> object:
    """Run sliced distillation work on a member to its end: sleep while a reduction waits, else go on."""
    from ..transport.backoff import Backoff
    backoff = Backoff()
    while True:
        try:
            signal = next(work)
        except StopIteration as done:
            return done.value
        if signal == WAIT:
            backoff.idle()
        else:
            backoff.reset()


def sum_gradients(group: Solo, params: Sequence[torch.Tensor],
                  scalar: torch.Tensor) -> Generator[str, None, torch.Tensor]:
    """Replace each parameter's gradient by its sum over the group and return the summed `scalar` (a loss).

    Solo: nothing changes and `scalar` is returned as it is. A parameter without a gradient on this rank (it
    owns no teacher, or the term that reaches it was dropped) contributes zeros."""
    if group.size == 1:
        return scalar
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    *summed, total = yield from group.reduce(grads + [scalar.detach().reshape(1)])
    for p, g in zip(params, summed):
        p.grad = g
    return total.reshape(())


# -- the algorithm's side: what rank 0 sends, what a member runs --------------------------------------------------

def in_group(algorithm, method: str, ctx, start: torch.Tensor, **extra) -> Generator:
    """Run `algorithm.<method>(ctx, start, **extra)`, a sliced distillation (one of the algorithm's
    `group_methods`), on every group rank: rank 0 first sends each member the call (the teacher buffer's
    view, the member's new teacher models, the algorithm's random state), then runs it itself and returns
    its result (a member's is dropped)."""
    teachers, group = algorithm.teachers, algorithm.teachers.group
    if group.size > 1:
        view, rng, model = teachers.view(), algorithm.rng.get_state().numpy(), start.detach().cpu().numpy()
        group.call(lambda member: {"kind": "call", "method": method, "version": ctx.version, "start": model,
                                   "view": view, "models": teachers.new_models_for(member), "rng": rng,
                                   "extra": extra})
    return (yield from getattr(algorithm, method)(ctx, start, **extra))


def share_state(algorithm, group: Solo) -> None:
    """Rank 0: give every member the algorithm's state (at the start and after a resume), so that the
    replicated parts (generator, pool, filters, random streams) start equal."""
    if group.size > 1:
        state = algorithm.state_dict()
        group.call(lambda member: {"kind": "state", "state": state})
        algorithm.teachers.delivered = set(algorithm.teachers.serials)   # the state carries every model


def serve(group: Group, algorithm, ctx) -> dict:
    """A member's loop: run rank 0's calls until it says stop; returns this rank's timing stats."""
    import dataclasses
    import time
    t0, idle, calls = time.perf_counter(), 0.0, 0
    while True:
        waited = time.perf_counter()
        command = group.receive()
        idle += time.perf_counter() - waited
        if command["kind"] == "stop":
            break
        if command["kind"] == "state":
            algorithm.load_state_dict(command["state"])
            continue
        method = command["method"]
        if method not in algorithm.group_methods:
            raise RuntimeError(f"{type(algorithm).__name__} has no group method {method!r}")
        start = torch.from_numpy(command["start"]).to(ctx.device)
        ctx = dataclasses.replace(ctx, version=command["version"], global_model=start)
        algorithm.teachers.adopt(command["view"], command["models"])
        algorithm.rng.set_state(torch.from_numpy(command["rng"]))
        drive(getattr(algorithm, method)(ctx, start, **command["extra"]))
        calls += 1
    return {"rank": group.rank, "role": "distil", "calls": calls, "wall_seconds": time.perf_counter() - t0,
            "idle_seconds": idle}
