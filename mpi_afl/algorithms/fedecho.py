"""FedEcho (arXiv 2511.19966): uncertainty-aware distillation for asynchronous FL, as reconstructed in
docs/algorithms.md §4 from the paper's abstract (the derivation of each step, why it is chosen and what it
measures are there). Every choice below is a config key.

On every arrival (docs/algorithms.md §4, steps 1-8):

1. Parameter step: `echo.backbone` "ca2fl" (CA2FL's cached aggregation of M = `server.buffer_size`
   updates, x' = x_t + η v_t) or "fedbuff" (its buffer, its optional server momentum); neither discounts
   staleness, whatever `server.staleness` says. The backbone object is used as is; the weight it
   reports is the update's.
2. Teachers: the latest model w_k = x_{v_k} + Δ_k of each of the C = `echo.teachers` most recently
   heard-from distinct clients, with staleness τ_k = t − v_k at distillation time.
3. Inputs (`echo.inputs`): "synthetic", the shared meta-generator's images (distill/synthesizer.py, as
   FedRevive, with the teachers' class proportions q_k from `distill.proxy`), or "proxy", the unlabeled KD
   split `ctx.kd_x`. Each KD iteration uses one batch that every teacher labels: the union of
   `distill.kd_batch` pool images drawn per teacher from its q_k, or K · kd_batch uniform proxy draws.
4. Teacher weights a_k(x) (`echo.weighting`), from the teachers' softmax outputs p_k(x) and a staleness
   prior s_k = s(τ_k) in [0, 1] (`echo.staleness_factor`, staleness.discount):
       reference   p̂(x) = Σ_k s_k p_k(x) / Σ_k s_k   (the plain mean when every s_k is 0)
       reliability ρ_k = s_k + (1 − s_k) κ_k,  κ_k = batch mean of Σ_c min(p_k^c, p̂^c)
   "expert" (default; synthetic inputs only): a_k(x) = ρ_k q_k(y_x) / Σ_j ρ_j q_j(y_x), y_x the class
   image x was generated for; a class no teacher has gets ρ_k / Σ_j ρ_j.
   "relative": c_k(x) = Σ_c p_k^c log p̂^c = −H(p_k) − KL(p_k ‖ p̂) and
       a_k(x) = ρ_k exp(c_k(x)/γ) / Σ_j ρ_j exp(c_j(x)/γ),  γ = `echo.gamma`.
   "entropy": a_k(x) = softmax_k(−H(p_k(x))/γ), times s_k and renormalised (all s_k = 0: the entropy
   weights alone).
5. Target p̄(x) = Σ_k a_k(x) softmax(z_k(x)/T); the student starts at x' and takes `distill.kd_steps` Adam
   steps (`kd_lr`, `kd_weight_decay`, a fresh optimizer per call) on the batch mean of
   T² KL(p̄ ‖ softmax(z_S/T)).
6. Bounded correction: new parameters x' + η_kd · b · (x_S − x'), η_kd = `echo.kd_step` in [0, 1], b the
   share (`echo.kd_share`): "staleness" b = beta(M · τ̄) with FedRevive's beta (`distill.beta`,
   `server.s_max`, staleness.beta) and τ̄ the mean staleness of the M buffered updates that made x';
   "constant" b = 1. KD runs only when η_kd · b > 0; η_kd = 0 with norm_stats "keep" is the backbone
   exactly (no synthesis, no KD).
7. Gates as FedRevive (§3.1): with synthetic inputs nothing runs below `distill.freeze_versions`, the
   generator trains up to `distill.warmup_versions` (L_adv only beyond it) and KD runs beyond it; with proxy
   inputs KD runs beyond `warmup_versions`. Distillation happens only when the backbone makes a new model.
8. Normalisation statistics (`echo.norm_stats`): "keep" takes the running statistics of x' and only the
   parameters from the corrected model; "reset" applies FedRevive's step 5
   (models/layers.reset_norm_statistics: stat trackers only) to every new model.

Diagnostics (notes for algorithm_stats, base.py): `kd_norm_ratio` / `kd_cosine` of the applied correction
against the backbone's step; `kd_loss_change` = L(new model) − L(the same step without the correction) on FedRevive's held-out
check images (distill.kd.loss_check, `distill.kd_check_images`), logged in run.h5 kd_checks with share
η_kd · b and the buffered updates' mean staleness, rounded; running means of b over the
`echo_distillations` new models beyond warm-up (`echo_kd_share`), of the teachers' mean ρ over the
`echo_corrections` that ran KD ("relative" and "expert"; `echo_reliability`) and, with synthetic inputs, of
the share of KD images whose target p̄(x) has its argmax at the class the image was made for
(`echo_target_agreement`).

`on_update` returns the backbone's `Outcome` directly while it only buffers or while the gates keep distillation
off, and otherwise a generator that yields after every generator step and KD iteration and returns the corrected
model's `Outcome` (base.py); the logged weight is the backbone's. Randomness comes only from torch.Generator
objects seeded from `run.seed`; all state is in `state_dict()`.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Generator

import torch
import torch.nn.functional as F

from mpi_afl.config import ConfigError
from mpi_afl.distill.group import in_group, sum_gradients
from mpi_afl.distill.kd import OutlierFilter, loss_check, record_kd
from mpi_afl.distill.proxy import ProbeProxy
from mpi_afl.distill.synthesizer import Synthesizer
from mpi_afl.distill.teachers import TeacherBuffer
from mpi_afl.models.flat import flatten, load_flat
from mpi_afl.models.layers import reset_norm_statistics

from .base import Algorithm, Outcome, Reply, ServerContext, Update
from .ca2fl import CA2FL
from .fedbuff import FedBuff
from .fedrevive import stream_seed, synthesis_due
from .staleness import beta as staleness_beta
from .staleness import discount

BACKBONES: dict[str, type[Algorithm]] = {"fedbuff": FedBuff, "ca2fl": CA2FL}

# Random streams of FedEcho (distinct from FedRevive's tags 1 and 2).
_SYNTHESIS_STREAM, _SERVER_STREAM = 3, 4


def entropy_weights(probs: torch.Tensor, gamma: float,
                    staleness_weights: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher weights a_k(x) (K, B) from teacher predictive distributions `probs` (K, B, C).

    a_k(x) = softmax_k(−H_k(x)/γ) with H_k the entropy of probs[k, x]: the most
    confident teacher of each sample gets the largest weight, and every
    teacher keeps a positive one. γ → ∞ gives the plain mean, γ → 0 the most
    confident teacher alone. With `staleness_weights` (K,) = s(τ_k) the
    weights are multiplied by them and renormalised per sample; a sample
    where every product is 0 (all teachers fully discounted) keeps the
    entropy weights alone rather than a zero target."""
    if probs.dim() != 3:
        raise ValueError(f"probs must have shape (teachers, batch, classes), got {tuple(probs.shape)}")
    entropy = torch.special.entr(probs).sum(dim=-1)  # -p log p with 0 log 0 = 0
    weights = torch.softmax(-entropy / gamma, dim=0)
    if staleness_weights is None:
        return weights
    s = staleness_weights.to(weights.device, weights.dtype)
    if s.shape != (probs.shape[0],) or bool((s < 0).any()):
        raise ValueError(f"staleness_weights must be {probs.shape[0]} non-negative values, got {s.tolist()}")
    scaled = weights * s[:, None]
    total = scaled.sum(dim=0, keepdim=True)
    return torch.where(total > 0, scaled / total.clamp_min(torch.finfo(total.dtype).tiny), weights)


def relative_weights(probs: torch.Tensor, gamma: float,
                     staleness_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher weights a_k(x) (K, B) and reliabilities ρ_k (K,) from `probs` (K, B, C) and the staleness
    prior `staleness_weights` s_k (K,) in [0, 1] (None: every teacher fresh, s = 1); step 4 of the module
    docstring, "relative"."""
    if probs.dim() != 3:
        raise ValueError(f"probs must have shape (teachers, batch, classes), got {tuple(probs.shape)}")
    s = torch.ones(probs.shape[0]) if staleness_weights is None else staleness_weights
    s = s.to(probs.device, probs.dtype)
    if s.shape != (probs.shape[0],) or bool((s < 0).any()) or bool((s > 1).any()):
        raise ValueError(f"staleness_weights must be {probs.shape[0]} values in [0, 1], got {s.tolist()}")
    prior = s if bool(s.sum() > 0) else torch.ones_like(s)
    reference = (prior[:, None, None] * probs).sum(dim=0) / prior.sum()
    agreement = torch.minimum(probs, reference).sum(dim=-1).mean(dim=-1)
    reliability = s + (1 - s) * agreement
    # p log p̂ with p̂ clamped: a class the reference gives 0 only occurs with p = 0 (p̂ >= s_k p_k / Σ s).
    score = (probs * reference.clamp_min(torch.finfo(probs.dtype).tiny).log()).sum(dim=-1)
    weights = torch.softmax(reliability.log()[:, None] + score / gamma, dim=0)
    return weights, reliability


def expert_weights(proportions: torch.Tensor, labels: torch.Tensor, reliability: torch.Tensor) -> torch.Tensor:
    """Teacher weights a_k(x) (K, B) of "expert" (step 4): ρ_k q_k(y_x) / Σ_j ρ_j q_j(y_x), from the teachers'
    class proportions `proportions` q (K, C), the class y_x each synthetic image was generated for `labels` (B,)
    and the reliabilities `reliability` ρ (K,) of "relative". A class no teacher claims (every product 0) gets
    the reliability weights alone, never a zero target."""
    if proportions.dim() != 2 or reliability.shape != (proportions.shape[0],) or labels.dim() != 1:
        raise ValueError(f"need proportions (K, C), labels (B,) and reliability (K,), got "
                         f"{tuple(proportions.shape)}, {tuple(labels.shape)}, {tuple(reliability.shape)}")
    products = (reliability[:, None] * proportions)[:, labels.to(proportions.device)]
    total = products.sum(dim=0, keepdim=True)
    fallback = (reliability / reliability.sum())[:, None].expand_as(products)
    # Normalised exactly: kd.class_weights' 1e-8 floor would leave a column with a tiny sum below 1.
    return torch.where(total > 0, products / total.clamp_min(torch.finfo(total.dtype).tiny), fallback)


def teacher_staleness(cfg, teacher_versions: list[int], version: int) -> torch.Tensor | None:
    """s(τ_k) of every teacher, τ_k = version − v_k (`echo.staleness_factor`), or None for "none"."""
    name = cfg.echo.staleness_factor
    if name == "none":
        return None
    return torch.tensor([discount(name, version - v, cfg.server) for v in teacher_versions])


def teacher_weights(logits: torch.Tensor, s: torch.Tensor | None, echo, proportions: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """a_k(x) of `echo.weighting` (step 4) for teacher logits (K, B, C) and staleness prior `s`, and the
    reliabilities ρ_k ("relative", "expert") or None ("entropy"). "expert" needs the teachers' class
    `proportions` (K, C) and the synthetic images' `labels` (B,)."""
    probs = torch.softmax(logits, dim=-1)
    if echo.weighting == "entropy":
        return entropy_weights(probs, echo.gamma, s), None
    weights, reliability = relative_weights(probs, echo.gamma, s)
    if echo.weighting == "expert":
        weights = expert_weights(proportions, labels, reliability)
    return weights, reliability


def echo_target(logits: torch.Tensor, weights: torch.Tensor, temperature: float) -> torch.Tensor:
    """p̄(x) = Σ_k a_k(x) softmax(z_k(x)/T): logits (K, B, C), weights (K, B) -> (B, C)."""
    return (weights[..., None] * torch.softmax(logits / temperature, dim=-1)).sum(dim=0)


def all_teacher_logits(teachers, inputs: torch.Tensor) -> Generator[str, None, torch.Tensor]:
    """Every teacher's logits (K, N, C) on the shared batch `inputs`: within a distillation group each rank
    fills the rows of its own teachers and the group sums them (adding zeros is exact)."""
    mine = teachers(inputs)
    if teachers.group.size == 1:
        return mine
    every = mine.new_zeros(teachers.total, *mine.shape[1:])
    every[teachers.owned] = mine
    return (yield from teachers.group.reduce([every]))[0]


def soft_kl(student_logits: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Batch mean of T² KL(target ‖ softmax(z_S/T)) for a target given as probabilities (B, C).

    A mixture of softmaxes has no logits, so this is not distill.kd.kl_div;
    xlogy makes classes with target probability 0 contribute 0."""
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    per_sample = (torch.xlogy(target, target) - target * log_s).sum(dim=-1)
    return per_sample.mean() * temperature ** 2


class FedEcho(Algorithm):
    name = "fedecho"
    # `distill` runs on every rank of a distillation group (distill.ranks, distill/group.py).
    group_methods = frozenset({"distill"})

    @classmethod
    def check_config(cls, cfg) -> None:
        if cfg.echo.inputs == "proxy" and cfg.data.kd_fraction <= 0:
            raise ConfigError("config key 'data.kd_fraction': fedecho with echo.inputs = 'proxy' distils on the "
                              "held-out split, so it must be > 0")

    def __init__(self, cfg, ctx: ServerContext):
        super().__init__(cfg, ctx)
        echo, d = cfg.echo, cfg.distill
        if echo.inputs == "proxy" and (ctx.kd_x is None or len(ctx.kd_x) == 0):
            raise ValueError("fedecho with echo.inputs = 'proxy' distils on the unlabeled KD split, but the server "
                             "context has none; set data.kd_fraction > 0, or use echo.inputs = 'synthetic'")
        # §4 step 1: the buffered step has no staleness discount, whatever server.staleness says.
        plain = dataclasses.replace(cfg, server=dataclasses.replace(cfg.server, staleness="none"))
        self.backbone = BACKBONES[echo.backbone](plain, ctx)
        self.rng = torch.Generator()
        self.rng.manual_seed(stream_seed(cfg.run.seed, _SERVER_STREAM))
        self.student = ctx.make_model()
        self.batch_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in self.student.modules())
        self.param_mask = ctx.param_mask
        self.kd_filter = OutlierFilter()
        self.synthetic = echo.inputs == "synthetic"
        self.kd_x = ctx.kd_x
        # q_k only steers synthetic inputs, so only then is the probe proxy fed.
        self.teachers = TeacherBuffer(echo.teachers, ctx.make_model, ctx.device, ctx.client_histograms,
                                      ProbeProxy(ctx.image_shape, ctx.num_classes, d.probes, d.probe_temperature),
                                      proportions=d.proxy if self.synthetic else "histogram", distinct=True,
                                      generator=self.rng, group=ctx.group)
        self.synth = Synthesizer(d, ctx.image_shape, ctx.num_classes, ctx.data_mean, ctx.data_std, ctx.device,
                                 stream_seed(cfg.run.seed, _SYNTHESIS_STREAM)) if self.synthetic else None
        self.last_synthesis = -1  # version of the last synthesis, -1 = never
        self.buffer_staleness: list[int] = []  # staleness of the updates in the backbone's current buffer

    # -- arrivals -------------------------------------------------------------

    def on_update(self, update: Update, ctx: ServerContext) -> Reply:
        # §4 step 2: the client's new model w = x_v + Δ becomes its teacher, at the front of the buffer.
        self.teachers.push(update.client_id, update.base_version, ctx.snapshot(update.base_version) + update.delta)
        self.buffer_staleness.append(update.staleness)
        step = self.backbone.on_update(update, ctx)
        if step.model is None:
            return step
        # Both backbones return a model exactly when their buffer of M updates is full.
        staleness = sum(self.buffer_staleness) / len(self.buffer_staleness)
        self.buffer_staleness.clear()
        d = self.cfg.distill
        active = ctx.version >= d.freeze_versions if self.synthetic else ctx.version > d.warmup_versions
        if not active or self.cfg.echo.kd_step == 0:
            return Outcome(self.finish(step.model, step.model), weight=step.weight)
        return self._corrected(ctx, step, staleness)

    def _corrected(self, ctx: ServerContext, step: Outcome, staleness: float) -> Generator[None, None, Outcome]:
        out = yield from in_group(self, "distill", ctx, step.model, staleness=staleness)
        out.weight = step.weight
        return out

    # -- distillation ---------------------------------------------------------

    def kd_share(self, staleness: float) -> float:
        """Share b of the KD correction for buffered updates of mean staleness τ̄ = `staleness` (step 6)."""
        if self.cfg.echo.kd_share == "constant":
            return 1.0
        return staleness_beta(self.cfg.server.buffer_size * staleness, self.cfg.distill, self.cfg.server.s_max)

    def draw(self, q: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One KD batch shared by all teachers (§4 step 3; see the module docstring), and the classes the
        synthetic images were generated for (None for proxy inputs)."""
        n = self.cfg.distill.kd_batch
        if self.synthetic:
            images, labels = zip(*(self.synth.sample(q[k], n) for k in range(len(q))))
            return torch.cat(images), torch.cat(labels)
        indices = torch.randint(len(self.kd_x), (n * len(self.teachers),), generator=self.rng)
        return self.kd_x[indices.to(self.kd_x.device)], None

    def distill(self, ctx: ServerContext, x_new: torch.Tensor,
                staleness: float) -> Generator[None, None, Outcome]:
        """The corrected model of the backbone's step `x_new` (its weight left to `on_update`)."""
        d, echo, version, notes = self.cfg.distill, self.cfg.echo, ctx.version, []
        teachers = self.teachers.ensemble()
        q = self.teachers.proportions() if self.synthetic else None
        load_flat(self.student, x_new)
        if self.synthetic and synthesis_due(self.last_synthesis, version, d.synth_every):
            yield from self.synth.synthesize(teachers, q, self.student, adversarial=version > d.warmup_versions,
                                             notes=notes)
            self.last_synthesis = version
        if version <= d.warmup_versions:
            return Outcome(self.finish(x_new, x_new), notes=notes)
        share = self.kd_share(staleness)
        notes.append(("echo_distillations", {"echo_kd_share": share}))
        step = echo.kd_step * share
        if step == 0:
            return Outcome(self.finish(x_new, x_new), notes=notes)
        s = teacher_staleness(self.cfg, self.teachers.versions, version)
        reliability = agreement = 0.0
        optimizer = torch.optim.Adam(self.student.parameters(), lr=d.kd_lr, weight_decay=d.kd_weight_decay)
        self.student.train()  # as distill.kd.distill: the research code distils in train mode
        group, params = teachers.group, list(self.student.parameters())
        for _ in range(d.kd_steps):
            inputs, labels = self.draw(q)
            with torch.no_grad():
                logits = yield from all_teacher_logits(teachers, inputs)
                weights, rho = teacher_weights(logits, s, echo, q, labels)
                target = echo_target(logits, weights, d.temperature)
            if rho is not None:
                reliability += float(rho.mean()) / d.kd_steps
            if labels is not None:
                agreement += float((target.argmax(dim=-1) == labels.to(target.device)).float().mean()) / d.kd_steps
            # Each group rank takes its share of the rows (all of them with BatchNorm, whose train-mode output
            # depends on the batch: every rank then computes the whole loss and nothing is summed).
            rows = slice(None) if self.batch_norm else group.rows(len(inputs))
            share = len(inputs[rows]) / len(inputs)   # the batch mean over the shares: sum_r mean_r * n_r / n
            loss = soft_kl(self.student(inputs[rows]), target[rows], d.temperature) * share
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if not self.batch_norm:
                loss = yield from sum_gradients(group, params, loss)
            if self.kd_filter(loss) is not None:
                optimizer.step()
            yield
        # Step 6: lerp is exact at both ends, so step 1 is the student itself (the first reconstruction).
        corrected = torch.lerp(x_new, flatten(self.student), step)
        record_kd(notes, (corrected - x_new)[self.param_mask], (x_new - ctx.global_model)[self.param_mask])
        notes.append(("echo_corrections", {
            **({"echo_reliability": reliability} if echo.weighting != "entropy" else {}),
            **({"echo_target_agreement": agreement} if self.synthetic else {})}))
        out = Outcome(self.finish(corrected, x_new), notes=notes)
        if ctx.check_x is not None:
            # The KD diagnostic: the new model against the same step without its correction.
            before, after = yield from loss_check(self.student, notes, self.finish(x_new, x_new), out.model,
                                                  ctx.check_x, ctx.check_y, teachers.group)
            out.kd_check = {"version": version, "staleness": round(staleness), "share": step,
                            "loss_before": before, "loss_after": after}
        return out

    def finish(self, model: torch.Tensor, x_new: torch.Tensor) -> torch.Tensor:
        """The new global model: the parameters of `model` with the statistics `echo.norm_stats` picks."""
        merged = torch.where(self.param_mask, model, x_new)
        if self.cfg.echo.norm_stats == "keep":
            return merged
        load_flat(self.student, merged)
        reset_norm_statistics(self.student)
        return flatten(self.student)

    # -- state ----------------------------------------------------------------

    def state_dict(self) -> dict:
        state = {"backbone": self.backbone.state_dict(), **self.teachers.state_dict(), "rng": self.rng.get_state(),
                 "kd_filter": self.kd_filter.state_dict(), "last_synthesis": self.last_synthesis,
                 "buffer_staleness": torch.tensor(self.buffer_staleness, dtype=torch.int64)}
        if self.synth is not None:
            state["synthesizer"] = self.synth.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.backbone.load_state_dict(state["backbone"])
        self.teachers.load_state_dict(state)
        self.rng.set_state(torch.as_tensor(state["rng"]).to(torch.uint8).cpu())
        self.kd_filter.load_state_dict(state["kd_filter"])
        self.last_synthesis = int(state["last_synthesis"])
        self.buffer_staleness = torch.as_tensor(state["buffer_staleness"]).tolist()
        if self.synth is not None:
            self.synth.load_state_dict(state["synthesizer"])
