"""FedRevive (arXiv 2511.00655) and its data-dependent reference DD-FedRevive.

docs/algorithms.md §3.1, on every arrival (B = 1):

1. tau = staleness, beta = beta(tau) (§3.2, `distill.beta`, `server.s_max`);
2. the client model w_i = x_v + Delta_i goes to the front of a buffer of the
   c = `distill.teachers` most recent client models (the teachers);
3. if beta > 0 and KD is active, distil the teachers into a student that
   starts at x_t, Delta_KD = x_student - x_t, and blend
       Delta~ = (1 - beta) Delta_i + beta Delta_KD;
   before KD has run, the update passes unchanged (it is never shrunk);
4. x_{t+1} = x_t + eta Delta~, eta = `server.lr`;
5. the running statistics of x_{t+1}'s normalisation layers are reset.

FedRevive distils data-free (§3.3): below `freeze_versions` nothing runs; up
to `warmup_versions` the generator trains but no KD is applied; beyond, full
KD (with L_adv in the synthesis). DD-FedRevive (§3.4) distils on the real KD
split instead, with fixed beta, T and lr and no warm-up (as the research
code's simple-KD path).

`on_update` returns a generator: it yields between generator steps and KD
iterations so the server keeps polling MPI, and returns the `Outcome` (base.py):
the new model, beta as the update's weight, the KD diagnostic and notes. All randomness comes
from torch.Generator objects seeded from `run.seed`, and everything kept
between arrivals is in `state_dict()`.
"""

from collections.abc import Generator
from dataclasses import dataclass, field

import numpy as np
import torch

from mpi_afl.config import ConfigError
from mpi_afl.distill import kd
from mpi_afl.distill.group import in_group
from mpi_afl.distill.pool import sample_by_class
from mpi_afl.distill.proxy import ProbeProxy
from mpi_afl.distill.synthesizer import Synthesizer
from mpi_afl.distill.teachers import TeacherBuffer
from mpi_afl.models.flat import flatten, load_flat
from mpi_afl.models.layers import reset_norm_statistics

from .base import Algorithm, Note, Outcome, ServerContext, Update
from .staleness import beta as staleness_beta

# Tags that give each random stream of the algorithm its own seed.
_SYNTHESIS_STREAM, _SERVER_STREAM = 1, 2


def synthesis_due(last_synthesis: int, version: int, synth_every: int) -> bool:
    """Synthesise at the first DFKD call (`last_synthesis` -1) and then every `synth_every` versions."""
    return last_synthesis < 0 or version - last_synthesis >= synth_every


@dataclass
class Knowledge:
    """What `knowledge` returns: Delta_KD (None when KD did not run), its KD diagnostic row and notes."""
    delta: torch.Tensor | None = None
    kd_check: dict | None = None
    notes: list[Note] = field(default_factory=list)


def stream_seed(seed: int, stream: int) -> int:
    """A seed for one named random stream of a run (hashing keeps nearby seeds unrelated)."""
    value = np.random.SeedSequence([seed, 0x5EB1, stream]).generate_state(1, dtype=np.uint64)[0]
    return int(value) & (2**63 - 1)


class _TeacherDistillation(Algorithm):
    """The flow shared by FedRevive and DD-FedRevive: teacher buffer, blend, aggregation, timing."""

    # `knowledge` runs on every rank of a distillation group (distill.ranks, distill/group.py).
    group_methods = frozenset({"knowledge"})

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.distill.ranks and cfg.model.norm == "batchnorm":
            raise ConfigError("config key 'distill.ranks': with model.norm = 'batchnorm' the KD student's running "
                              "statistics depend on the order of all teachers' batches, which a group does not "
                              "keep; use distill.ranks = 0 or model.norm = 'stat' (the default)")

    def __init__(self, cfg, ctx: ServerContext, proportions: str):
        super().__init__(cfg, ctx)
        d = cfg.distill
        self.rng = torch.Generator()
        self.rng.manual_seed(stream_seed(cfg.run.seed, _SERVER_STREAM))
        self.student = ctx.make_model()
        # `proportions`: where the teachers' q_k come from (TeacherBuffer).
        self.teachers = TeacherBuffer(d.teachers, ctx.make_model, ctx.device, ctx.client_histograms,
                                      ProbeProxy(ctx.image_shape, ctx.num_classes, d.probes, d.probe_temperature),
                                      proportions=proportions, distinct=False, generator=self.rng,
                                      group=ctx.group)

    def active(self, version: int) -> bool:
        """Whether `knowledge` does any work at `version` (FedRevive: not below distill.freeze_versions)."""
        return True

    def beta(self, tau: int) -> float:
        raise NotImplementedError

    def knowledge(self, ctx: ServerContext, x_t: torch.Tensor,
                  share: float) -> Generator[None, None, Knowledge]:
        """Distil the teachers into a student from x_t; returns Delta_KD (None when KD did not run) with its
        diagnostics. `share` = eta beta, the part of Delta_KD the blend applies (for the KD diagnostic,
        `distilled`)."""
        raise NotImplementedError

    def distilled(self, ctx: ServerContext, x_t: torch.Tensor, share: float,
                  notes: list[Note]) -> Generator[None, None, Knowledge]:
        """Delta_KD = the student - x_t, after the KD diagnostic (kd.loss_check): L(x_t + share Delta_KD) - L(x_t)
        on ctx.check_x, the change when only the KD part of the step is applied; logged per call (run.h5
        kd_checks; `_arrive` adds the staleness). Inside `knowledge`, so a group shares the check's images."""
        kd_delta = flatten(self.student) - x_t
        if ctx.check_x is None:
            return Knowledge(kd_delta, None, notes)
        before, after = yield from kd.loss_check(self.student, notes, x_t, x_t + share * kd_delta,
                                                 ctx.check_x, ctx.check_y, ctx.group)
        check = {"version": ctx.version, "share": share, "loss_before": before, "loss_after": after}
        return Knowledge(kd_delta, check, notes)

    def on_update(self, update: Update, ctx: ServerContext) -> Generator[None, None, Outcome]:
        return self._arrive(update, ctx)

    def _arrive(self, update: Update, ctx: ServerContext) -> Generator[None, None, Outcome]:
        weight = self.beta(update.staleness)
        out = Outcome(weight=weight)
        model = ctx.snapshot(update.base_version) + update.delta
        self.teachers.push(update.client_id, update.base_version, model)
        x_t = ctx.global_model
        step = update.delta
        if weight > 0 and self.active(ctx.version):
            knowledge = yield from in_group(self, "knowledge", ctx, x_t, share=self.cfg.server.lr * weight)
            out.notes = knowledge.notes
            if knowledge.delta is not None:
                step = (1.0 - weight) * update.delta + weight * knowledge.delta
                kd.record_kd(out.notes, knowledge.delta[ctx.param_mask], update.delta[ctx.param_mask])
                if knowledge.kd_check is not None:
                    out.kd_check = {**knowledge.kd_check, "staleness": update.staleness}
        load_flat(self.student, x_t + self.cfg.server.lr * step)
        reset_norm_statistics(self.student)
        out.model = flatten(self.student)
        return out

    def state_dict(self) -> dict:
        return {**self.teachers.state_dict(), "rng": self.rng.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.teachers.load_state_dict(state)
        self.rng.set_state(torch.as_tensor(state["rng"]).to(torch.uint8).cpu())


class FedRevive(_TeacherDistillation):
    """Data-free KD for stale updates: meta-generator synthesis, then multi-teacher KD (§3.3)."""

    name = "fedrevive"

    def __init__(self, cfg, ctx: ServerContext):
        super().__init__(cfg, ctx, proportions=cfg.distill.proxy)
        d = cfg.distill
        self.synth = Synthesizer(d, ctx.image_shape, ctx.num_classes, ctx.data_mean, ctx.data_std, ctx.device,
                                 stream_seed(cfg.run.seed, _SYNTHESIS_STREAM))
        self.kd_filter = kd.OutlierFilter()
        self.last_synthesis = -1  # version of the last synthesis, -1 = never

    def beta(self, tau: int) -> float:
        return staleness_beta(tau, self.cfg.distill, self.cfg.server.s_max)

    def active(self, version: int) -> bool:
        return version >= self.cfg.distill.freeze_versions

    def knowledge(self, ctx: ServerContext, x_t: torch.Tensor,
                  share: float) -> Generator[None, None, Knowledge]:
        d, version, notes = self.cfg.distill, ctx.version, []
        if version < d.freeze_versions:
            return Knowledge()
        teachers, q = self.teachers.ensemble(), self.teachers.proportions()
        load_flat(self.student, x_t)
        if self.last_synthesis < 0:
            # distill.pretrain: the meta-generator's pre-training, before the first regular synthesis.
            for _ in range(d.pretrain):
                yield from self.synth.synthesize(teachers, q, self.student, adversarial=False, notes=notes)
        if self.synthesis_due(version):
            # L_adv only once the KD warm-up is over (§3.3, step 3).
            yield from self.synth.synthesize(teachers, q, self.student, adversarial=version > d.warmup_versions,
                                             notes=notes)
            self.last_synthesis = version
        if version <= d.warmup_versions:
            return Knowledge(notes=notes)
        optimizer = torch.optim.Adam(self.student.parameters(), lr=d.kd_lr, weight_decay=d.kd_weight_decay)
        yield from kd.distill(self.student, teachers, lambda k: self.synth.sample(q[k], d.kd_batch)[0],
                              optimizer=optimizer, steps=d.kd_steps, temperature=d.temperature,
                              outliers=self.kd_filter)
        return (yield from self.distilled(ctx, x_t, share, notes))

    def synthesis_due(self, version: int) -> bool:
        return synthesis_due(self.last_synthesis, version, self.cfg.distill.synth_every)

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.update(synthesizer=self.synth.state_dict(), kd_filter=self.kd_filter.state_dict(),
                     last_synthesis=self.last_synthesis)
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.synth.load_state_dict(state["synthesizer"])
        self.kd_filter.load_state_dict(state["kd_filter"])
        self.last_synthesis = int(state["last_synthesis"])


class DDFedRevive(_TeacherDistillation):
    """Data-dependent reference (§3.4): the same flow, KD on the real held-out KD split.

    Fixed beta (`distill.dd_beta`, so even fresh updates are blended), T =
    `dd_temperature`, Adam(`dd_lr`) without weight decay; each teacher's batch
    is drawn to match its client's true label histogram and used as stored
    (already normalised, not augmented). It uses real data,
    so it is an upper reference, not a privacy-preserving method."""

    name = "dd_fedrevive"

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.data.kd_fraction <= 0:
            raise ConfigError("config key 'data.kd_fraction': dd_fedrevive distils on the real KD split, "
                              "so it must be > 0 (the paper uses 0.1)")
        super().check_config(cfg)

    def __init__(self, cfg, ctx: ServerContext):
        super().__init__(cfg, ctx, proportions="histogram")  # batches match the true label histograms
        if ctx.kd_x is None or ctx.kd_y is None or len(ctx.kd_x) == 0:
            raise ValueError("dd_fedrevive distils on the real KD split, but the server context has none; "
                             "set data.kd_fraction > 0 (the paper uses 0.1)")
        self.kd_x = ctx.kd_x
        self.kd_labels = ctx.kd_y.cpu()

    def beta(self, tau: int) -> float:
        return self.cfg.distill.dd_beta

    def knowledge(self, ctx: ServerContext, x_t: torch.Tensor,
                  share: float) -> Generator[None, None, Knowledge]:
        d = self.cfg.distill
        teachers, q = self.teachers.ensemble(), self.teachers.proportions()
        load_flat(self.student, x_t)
        optimizer = torch.optim.Adam(self.student.parameters(), lr=d.dd_lr)

        def draw(k: int) -> torch.Tensor:
            indices = sample_by_class(self.kd_labels, q[k], d.kd_batch, self.rng)
            return self.kd_x[indices.to(self.kd_x.device)]

        yield from kd.distill(self.student, teachers, draw, optimizer=optimizer, steps=d.kd_steps,
                              temperature=d.dd_temperature)
        return (yield from self.distilled(ctx, x_t, share, []))
