"""Look at a FedRevive (or synthetic-input FedEcho) run's synthetic images and measure how its models see them.

    python experiments/probes/synthetic_images.py RUN_DIR [RUN_DIR ...] [--out DIR] [--per-class 8] [--synth-steps 2,10,50]

Reads each RUN_DIR/checkpoint.h5 (the synthetic pool, the teacher buffer and the global model are all in
the algorithm's checkpointed state), writes DIR/<run name>-pool.png (one row per class, the newest pool
images conditioned on that class, as the teachers see them before normalisation) and prints one JSON line
per run:

  pool_images, pool_per_class        size of the FIFO pool and its label counts
  teacher_agreement                  fraction of pool images whose teacher-ensemble (mean logits of the
                                     buffered client models) argmax is the image's conditioning label
  mean_target_agreement              the same for the plain mean of the teachers' softmaxes
  echo_target_agreement              the same for FedEcho's weighted target, with the run's echo settings
                                     (weighting, gamma, staleness prior at the checkpoint's version)
  test_mean_target_accuracy, test_echo_target_accuracy   both targets on 2,000 real test images: does
                                     the weighting pick the right teachers on real data, on synthetic?
                                     (echo.weighting=expert weights by the image's class, so on test
                                     images it reads the labels: test_expert_target_accuracy with rho_k)
  test_expert_target_accuracy        the teachers as class experts, on the same test images: each image's
                                     target weights teacher k by q_k(y), its share of the image's true class
                                     y (the run's q_k; `_histogram`: the true label histograms). An oracle
                                     (it reads the labels), and what drawing each teacher's KD batch from its
                                     own q_k does with labelled inputs (FedRevive, DD-FedRevive)
  test_expert_by_global_accuracy     the same without labels: weights sum_c p_global^c(x) q_k(c), the class
                                     the final global model predicts standing in for y
  echo_weight_skew_correlation       Pearson r between each teacher's mean FedEcho weight on the pool images
                                     and the largest-class share of its client's data (the run's partition,
                                     rebuilt from its config): > 0 means the weighting leans on the
                                     most class-skewed clients
  global_agreement                   the same for the run's final global model
  global_confidence                  mean max-softmax of the global model on the pool images
  global_test_accuracy               the global model on the real test split, for comparison
  pool_pixel_mean/std, real_pixel_mean/std   in [0, 1] units: synthetic vs real training images
  pool_within_class_distance         mean pairwise L2 distance between pool images of one class (diversity),
  real_within_class_distance         the same for real training images (up to 256 per class)

With --kd-probe N, also `kd_probe`: the run's KD repeated from its final global model with its final teachers
for N iterations, once per input source, everything else fixed: `pool` (the run's synthetic pool, drawn per
teacher from its q_k as FedRevive draws), `pool_histogram` (the pool drawn from each teacher's true label
histogram, as with distill.proxy=histogram), `pool_balanced` (the pool with uniform class proportions), `kd_split`
(the real 10% KD split drawn from the true histograms, DD-FedRevive's inputs and draws; runs with
data.kd_fraction > 0 only: compare it with `pool_histogram` for the images alone) and
`noise` (Gaussian images, the floor), and with --kd-probe-fresh N[,N...] `fresh<N>`: 256 images synthesised
anew from the final meta-generator and teachers with N generator steps per call (labels and draws from the true
histograms; compare with `pool_histogram`: would more generator steps give images that carry the knowledge?).
For each, with FedRevive's KD settings (distill.kd_lr, kd_weight_decay, temperature) and with DD-FedRevive's
(dd_lr, dd_temperature, no decay): the held-out loss and accuracy change of the student against the global model
on the whole test split, and the norm of its parameter change (no outlier filter: every KD step is applied). Also
`proxy_tv`: the mean total variation between the run's q_k and the true label histograms of its clients. Every source
shares one seed, so the differences are the inputs' alone: which inputs carry the teachers' knowledge.

With --ceiling STEPS (and --kd-probe), two more KD sources, the ceiling test: `ceiling_all`, 256 images optimised
directly in pixel space against all final teachers (no generator: the synthesizer's oh * L_oh + bn * L_bn with its
class weights from the true histograms, a total-variation and an l2 prior, Adam for STEPS steps), and
`ceiling_experts`, each image against its class experts only (q_k(y) >= 0.2) with each teacher's L_bn on its own
images. If even these carry little of what the real KD split carries, the models' image prior is the limit, not
the generator. Always: `label_prior_control`, the class-expert target's agreement (teachers weighted by the run's
q_k(y)) on the pool, on uniform noise and on the pool with permuted labels: how much of that figure the label
prior alone gives.

With --synth-steps, also one line per step count N: the run's final meta-generator synthesises one batch
from the final teachers with N fast-generator steps (the run's other synthesis settings, no L_adv), and
`batch_teacher_agreement` is the teacher-ensemble agreement of the kept batch with its labels: how far a
synthesis call gets from the meta-generator the run ended with.

High agreement with high confidence means the images carry the teachers' class evidence; it says nothing
about whether they cover what the stale teachers know that the global model lacks, which is what KD needs.
"""

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))  # `python experiments/probes/synthetic_images.py` from anywhere

from mpi_afl.algorithms.fedecho import echo_target, teacher_staleness, teacher_weights  # noqa: E402
from mpi_afl.config import from_dict  # noqa: E402
from mpi_afl.data.datasets import load_splits  # noqa: E402
from mpi_afl.data.partition import class_histograms, partition  # noqa: E402
from mpi_afl.distill import kd  # noqa: E402
from mpi_afl.distill.ensemble import TeacherEnsemble  # noqa: E402
from mpi_afl.distill.pool import SyntheticPool, sample_by_class  # noqa: E402
from mpi_afl.distill.proxy import ProbeProxy, histogram_proportions  # noqa: E402
from mpi_afl.distill.synthesizer import Synthesizer  # noqa: E402
from mpi_afl.distill.teachers import TeacherBuffer  # noqa: E402
from mpi_afl.models import build_model  # noqa: E402
from mpi_afl.models.flat import flatten, load_flat, param_mask  # noqa: E402
from mpi_afl.server.state import check_server_format  # noqa: E402
from mpi_afl.slices import drain  # noqa: E402
from mpi_afl.storage.checkpoint import CheckpointError, load_checkpoint  # noqa: E402


def logits(model: torch.nn.Module, flat: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    load_flat(model, flat)
    model.eval()
    with torch.no_grad():
        return torch.cat([model(images[i:i + 512]) for i in range(0, len(images), 512)])


def normalise(images: torch.Tensor, info) -> torch.Tensor:
    """[0, 1] images as the models see them (the data set's normalisation, no augmentation)."""
    return (images - torch.tensor(info.mean).view(1, -1, 1, 1)) / torch.tensor(info.std).view(1, -1, 1, 1)


def teacher_logits(ensemble: TeacherEnsemble, images: torch.Tensor) -> torch.Tensor:
    """(teachers, images, classes) logits of every teacher, in slices of 512 images."""
    with torch.no_grad():
        return torch.cat([ensemble(images[i:i + 512]) for i in range(0, len(images), 512)], dim=1)


def target_agreement(per_teacher: torch.Tensor, labels: torch.Tensor, echo_weights=None) -> float:
    """How often the argmax of the teachers' combined prediction is `labels`: the plain mean of their
    softmaxes (`echo_weights` None) or FedEcho's weighted target; `echo_weights(logits, labels)` gives the
    weights (docs/algorithms.md §4; only echo.weighting=expert reads the labels)."""
    weights = (torch.full(per_teacher.shape[:2], 1 / len(per_teacher)) if echo_weights is None
               else echo_weights(per_teacher, labels))
    target = echo_target(per_teacher, weights, 1.0)
    return round(float((target.argmax(1) == labels).float().mean()), 4)


def weight_skew_correlation(per_teacher: torch.Tensor, labels: torch.Tensor, clients: list[int],
                            histograms: np.ndarray, echo_weights) -> float | None:
    """Pearson r between each teacher's mean FedEcho weight on the images and its client's largest-class share."""
    weights = echo_weights(per_teacher, labels).mean(1)
    skew = torch.tensor([histograms[c].max() / histograms[c].sum() for c in clients], dtype=torch.float32)
    if len(clients) < 3 or float(skew.std()) == 0:
        return None
    return round(float(torch.corrcoef(torch.stack([weights, skew]))[0, 1]), 3)


def within_class_distance(images: torch.Tensor, labels: torch.Tensor, num_classes: int, cap: int = 256) -> float:
    """Mean pairwise L2 distance between images of the same class (at most `cap` per class)."""
    distances = []
    for c in range(num_classes):
        members = images[labels == c][:cap].flatten(1)
        if len(members) > 1:
            d = torch.cdist(members, members)
            distances.append(d.sum() / (len(members) * (len(members) - 1)))
    return float(torch.stack(distances).mean()) if distances else float("nan")


def grid(images: torch.Tensor, labels: torch.Tensor, num_classes: int, per_class: int, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(num_classes, per_class, figsize=(per_class * 0.9, num_classes * 0.9))
    for c in range(num_classes):
        newest = images[labels == c][-per_class:]  # pool order: the ring's slots, newest last once full
        for j in range(per_class):
            ax = axes[c, j]
            ax.axis("off")
            if j < len(newest):
                picture = newest[j].permute(1, 2, 0).clamp(0, 1).numpy()
                ax.imshow(picture.squeeze(-1) if picture.shape[-1] == 1 else picture, cmap="gray", vmin=0, vmax=1)
        axes[c, 0].set_title(f"class {c}", fontsize=6, loc="left")
    fig.tight_layout(pad=0.1)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_synthesizer(cfg, algorithm: dict, info, **distill) -> Synthesizer:
    """The run's final synthesizer (meta-generator, pool, filters) with `distill` settings changed."""
    synth = Synthesizer(dataclasses.replace(cfg.distill, **distill), (info.channels, info.image_size, info.image_size),
                        info.num_classes, info.mean, info.std, torch.device("cpu"), cfg.run.seed)
    synth.load_state_dict(algorithm["synthesizer"])
    return synth


def synthesis_probe(cfg, algorithm: dict, info, teachers: TeacherBuffer, steps: int) -> dict:
    """One synthesis call with `steps` fast-generator steps from the run's final meta-generator and teachers."""
    synth = run_synthesizer(cfg, algorithm, info, synth_steps=steps)
    modules = teachers.ensemble()
    start = time.perf_counter()
    images, labels = drain(synth.synthesize(modules, teachers.proportions()))
    seconds = time.perf_counter() - start
    ensemble = teacher_logits(modules, normalise(images, info)).mean(0)
    return {"synth_steps": steps, "batch": len(labels), "seconds": round(seconds, 3),
            "batch_teacher_agreement": round(float((ensemble.argmax(1) == labels).float().mean()), 4),
            "batch_teacher_confidence": round(float(ensemble.softmax(1).max(1).values.mean()), 4)}


FRESH_IMAGES = 256  # images of each `fresh<N>` source of the KD probe


def fresh_synthesizer(cfg, algorithm: dict, info, teachers: TeacherBuffer, q: torch.Tensor, steps: int) -> Synthesizer:
    """A copy of the run's final synthesizer with an empty pool, filled with FRESH_IMAGES new images made with
    `steps` generator steps per call from the final teachers and class proportions `q`."""
    synth = run_synthesizer(cfg, algorithm, info, synth_steps=steps)
    synth.pool = SyntheticPool(FRESH_IMAGES)
    while len(synth.pool) < FRESH_IMAGES:
        drain(synth.synthesize(teachers.ensemble(), q))
    return synth


CEILING_EXPERT_SHARE = 0.2   # a teacher is an image's class expert when q_k(y) >= this (registered value)
CEILING_TV, CEILING_L2, CEILING_LR = 1e-3, 1e-4, 0.05   # image prior weights and Adam's lr, fixed before the runs


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of neighbouring pixels (DeepInversion's smoothness prior)."""
    return (x[..., 1:, :] - x[..., :-1, :]).square().mean() + (x[..., :, 1:] - x[..., :, :-1]).square().mean()


def ceiling_images(cfg, info, teachers: TeacherBuffer, make_model, true_q: torch.Tensor, steps: int, experts: bool,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The ceiling test's images: FRESH_IMAGES images optimised directly in pixel space against the final
    teachers, no generator. Labels follow the teachers' mean true class mix. The loss is the synthesizer's
    oh * L_oh + bn * L_bn with its class weights w_k(y) (true q), plus a total-variation and an l2 prior,
    minimised by Adam on a sigmoid pixel parameterisation ([0, 1] images). `experts`: each image answers only to
    its class experts (q_k(y) >= CEILING_EXPERT_SHARE, weights renormalised over them), and each teacher's L_bn
    is taken on the images it is an expert for, so a one-class teacher's statistics meet one-class images.
    Returns the [0, 1] images, their labels and diagnostics (teacher agreement of the result)."""
    d = cfg.distill
    g = torch.Generator().manual_seed(seed)
    labels = torch.multinomial(true_q.mean(0), FRESH_IMAGES, replacement=True, generator=g)
    weights = kd.class_weights(true_q)                     # (K, C): the synthesizer's w_k(y)
    if experts:
        expert = true_q >= CEILING_EXPERT_SHARE
        expert[true_q.argmax(0), torch.arange(true_q.shape[1])] = True   # every class keeps its best teacher
        weights = kd.class_weights(true_q * expert)
    sample_weights = weights[:, labels]                    # (K, B)
    stacked = torch.stack(teachers.models)
    singles = [TeacherEnsemble(make_model()).load(stacked[k:k + 1]) for k in range(len(stacked))]
    ensemble = teachers.ensemble()
    shape = (FRESH_IMAGES, info.channels, info.image_size, info.image_size)
    u = torch.randn(shape, generator=g).mul_(0.5).requires_grad_()
    optimizer = torch.optim.Adam([u], lr=CEILING_LR)
    for _ in range(steps):
        x = torch.sigmoid(u)
        inputs = normalise(x, info)
        if experts:   # per teacher: its own images, for L_oh and L_bn alike
            loss = 0.0
            for k, single in enumerate(singles):
                members = sample_weights[k] > 0
                if not members.any():
                    continue
                logits_k, distance_k = single.with_feature_loss(inputs[members])
                ce = torch.nn.functional.cross_entropy(logits_k[0], labels[members], reduction="none")
                loss = loss + (d.oh * (sample_weights[k, members] * ce).sum()
                               + d.bn * sample_weights[k, members].sum() * distance_k[0]) / FRESH_IMAGES
        else:
            logits_all, per_teacher = ensemble.with_feature_loss(inputs)
            ce = torch.nn.functional.cross_entropy(logits_all.flatten(0, 1), labels.repeat(len(stacked)),
                                                   reduction="none").view(len(stacked), -1)
            loss = (d.oh * (sample_weights * ce).sum()
                    + d.bn * (sample_weights.sum(1) * per_teacher).sum()) / FRESH_IMAGES
        loss = loss + CEILING_TV * total_variation(x) + CEILING_L2 * (x - 0.5).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    images = torch.sigmoid(u).detach()
    per_teacher_logits = teacher_logits(ensemble, normalise(images, info))
    votes = per_teacher_logits.mean(0).argmax(1)
    expert_votes = torch.einsum("kb,kbc->bc", sample_weights, per_teacher_logits.softmax(2)).argmax(1)
    return images, labels, {"teacher_agreement": round(float((votes == labels).float().mean()), 4),
                            "expert_target_agreement": round(float((expert_votes == labels).float().mean()), 4),
                            "final_loss": round(float(loss.detach()), 4)}


def label_prior_control(teachers: TeacherBuffer, info, images: torch.Tensor, labels: torch.Tensor,
                        seed: int) -> dict:
    """How much of the class-expert target's agreement the label prior alone gives: the target that weights
    teacher k by q_k(y) (the run's q) on the pool's images, on uniform-noise images and on the pool with its
    labels permuted. At alpha 0.1 an expert predicts its majority class on almost any input, so agreement on
    noise or permuted labels near the pool's means the figure measures the prior, not the images."""
    g = torch.Generator().manual_seed(seed)
    q = teachers.proportions()
    ensemble = teachers.ensemble()

    def expert_agreement(x: torch.Tensor, y: torch.Tensor) -> float:
        probs = teacher_logits(ensemble, normalise(x, info)).softmax(2)      # (K, B, C)
        target = torch.einsum("kb,kbc->bc", kd.class_weights(q)[:, y], probs)
        return round(float((target.argmax(1) == y).float().mean()), 4)

    noise = torch.rand(images.shape, generator=g)
    permuted = labels[torch.randperm(len(labels), generator=g)]
    return {"pool": expert_agreement(images, labels), "noise": expert_agreement(noise, labels),
            "pool_permuted_labels": expert_agreement(images, permuted),
            "chance_by_label_prior": round(float((labels == permuted).float().mean()), 4)}


def kd_probe(cfg, algorithm: dict, info, teachers: TeacherBuffer, true_q: torch.Tensor, splits, make_model,
             global_model: torch.Tensor, steps: int, fresh_steps: list[int], ceiling_steps: int = 0,
             ceiling_all_steps: int = 0) -> dict:
    """KD from the final teachers into the final global model on each input source (module docstring);
    `true_q` (K, C): the teachers' true label histograms as proportions."""
    d = cfg.distill
    synth = run_synthesizer(cfg, algorithm, info)
    modules, q = teachers.ensemble(), teachers.proportions()
    uniform = torch.full((info.num_classes,), 1.0 / info.num_classes)
    rng = torch.Generator()
    sources = {
        "pool": lambda k: synth.sample(q[k], d.kd_batch)[0],
        "pool_histogram": lambda k: synth.sample(true_q[k], d.kd_batch)[0],
        "pool_balanced": lambda k: synth.sample(uniform, d.kd_batch)[0],
        "noise": lambda k: torch.randn(d.kd_batch, info.channels, info.image_size, info.image_size, generator=rng),
    }
    synths, agreement = [synth], {}
    for n in fresh_steps:
        fresh = fresh_synthesizer(cfg, algorithm, info, teachers, true_q, n)
        sources[f"fresh{n}"] = lambda k, fresh=fresh: fresh.sample(true_q[k], d.kd_batch)[0]
        synths.append(fresh)
        images, labels = fresh.pool.images[:len(fresh.pool)], fresh.pool.labels[:len(fresh.pool)]
        votes = teacher_logits(modules, normalise(images, info)).mean(0).argmax(1)
        agreement[f"fresh{n}_teacher_agreement"] = round(float((votes == labels).float().mean()), 4)
    if len(splits.kd_y):
        sources["kd_split"] = lambda k: splits.kd_x[sample_by_class(splits.kd_y, true_q[k], d.kd_batch, rng)]
    if ceiling_steps:
        for variant, experts in (("ceiling_all", False), ("ceiling_experts", True)):
            n_steps = ceiling_steps if experts else (ceiling_all_steps or ceiling_steps)
            images, labels, diagnostics = ceiling_images(cfg, info, teachers, make_model, true_q, n_steps,
                                                         experts, cfg.run.seed)
            diagnostics["steps"] = n_steps
            ceiling = SyntheticPool(FRESH_IMAGES)
            ceiling.add(images, labels)
            holder = run_synthesizer(cfg, algorithm, info)
            holder.pool = ceiling
            sources[variant] = lambda k, holder=holder: holder.sample(true_q[k], d.kd_batch)[0]
            synths.append(holder)
            agreement.update({f"{variant}_{key}": value for key, value in diagnostics.items()})
    settings = {"fedrevive": (d.kd_lr, d.kd_weight_decay, d.temperature), "dd": (d.dd_lr, 0.0, d.dd_temperature)}
    student = make_model()
    trainable = param_mask(student)
    x, y = splits.test_x, splits.test_y
    loss_before = kd.held_out_loss(student, global_model, x, y)
    acc_before = float((logits(student, global_model, x).argmax(1) == y).float().mean())
    result = {"steps": steps, "test_loss": round(loss_before, 4), "test_accuracy": round(acc_before, 4),
              "proxy_tv": round(float(0.5 * (q - true_q).abs().sum(1).mean()), 3), "ceiling_steps": ceiling_steps,
              **agreement}
    for name, draw in sources.items():
        for label, (lr, decay, temperature) in settings.items():
            torch.manual_seed(cfg.run.seed)
            rng.manual_seed(cfg.run.seed)
            for each in synths:
                each.rng.manual_seed(cfg.run.seed)
            load_flat(student, global_model)
            optimizer = torch.optim.Adam(student.parameters(), lr=lr, weight_decay=decay)
            drain(kd.distill(student, modules, draw, optimizer=optimizer, steps=steps, temperature=temperature))
            after = flatten(student)
            acc = float((logits(student, after, x).argmax(1) == y).float().mean())
            result[f"{name}/{label}"] = {
                "loss_change": round(kd.held_out_loss(student, after, x, y) - loss_before, 4),
                "accuracy_change": round(acc - acc_before, 4),
                "parameter_change": round(float((after - global_model)[trainable].norm()), 4)}
    return result


def inspect(run_dir: Path, out: Path, per_class: int, probe_steps: list[int], kd_steps: int,
            fresh_steps: list[int], ceiling_steps: int = 0, ceiling_all_steps: int = 0) -> dict:
    state = load_checkpoint(run_dir / "checkpoint.h5")
    try:
        check_server_format(state)
    except CheckpointError as e:
        raise SystemExit(f"{run_dir}: {e} (a run made by an older version: run it again)")
    cfg = from_dict(json.loads(state["config"]))
    algorithm = state["algorithm"]
    if "synthesizer" not in algorithm:
        raise SystemExit(f"{run_dir}: {cfg.server.algorithm} keeps no synthetic pool")
    pool = algorithm["synthesizer"]["pool"]
    images, labels = torch.as_tensor(pool["images"]).float(), torch.as_tensor(pool["labels"]).long()
    # Pool rows are ring slots; put them oldest-first so "newest" means the last rows.
    head = int(pool["head"])
    if len(labels) and head:
        images, labels = torch.roll(images, -head, 0), torch.roll(labels, -head, 0)

    d = cfg.data
    splits = load_splits(d.dataset, d.root or None, seed=cfg.run.seed, val_fraction=d.val_fraction,
                         test_fraction=d.test_fraction, kd_fraction=d.kd_fraction)
    info = splits.info
    labels_np = splits.train_y.numpy()
    parts = partition(labels_np, d.num_clients, d.partition, seed=cfg.run.seed, num_classes=info.num_classes,
                      alpha=d.alpha, shards_per_client=d.shards_per_client, samples_per_client=d.samples_per_client)
    histograms = class_histograms(parts, labels_np, info.num_classes)  # the run's clients, as run/build.py builds them

    def make_model() -> torch.nn.Module:
        return build_model(cfg.model.name, in_channels=info.channels, image_size=info.image_size,
                           num_classes=info.num_classes, norm=cfg.model.norm)

    # The run's teacher buffer as checkpointed (q_k as in the run: probe proxy, histograms or uniform).
    teachers = TeacherBuffer(len(algorithm["teacher_clients"]), make_model, torch.device("cpu"), histograms,
                             ProbeProxy((info.channels, info.image_size, info.image_size), info.num_classes,
                                        cfg.distill.probes, cfg.distill.probe_temperature),
                             proportions=cfg.distill.proxy, distinct=False, generator=torch.Generator())
    teachers.load_state_dict(algorithm)
    modules = teachers.ensemble()
    pool_logits = teacher_logits(modules, normalise(images, info))
    ensemble = pool_logits.mean(0)
    test_x, test_y = splits.test_x[:2000], splits.test_y[:2000]
    test_logits = teacher_logits(modules, test_x)
    model = make_model()
    global_model = torch.as_tensor(state["global_model"]).float()
    global_logits = logits(model, global_model, normalise(images, info))
    test_accuracy = float((logits(model, global_model, splits.test_x).argmax(1) == splits.test_y).float().mean())
    real = splits.train_x * torch.tensor(info.std).view(1, -1, 1, 1) + torch.tensor(info.mean).view(1, -1, 1, 1)

    s = teacher_staleness(cfg, teachers.versions, int(state["version"]))

    def echo_weights(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        return teacher_weights(logits, s, cfg.echo, teachers.proportions(), classes)[0]

    true_q = torch.stack([histogram_proportions(histograms[c]) for c in teachers.clients])
    global_test = logits(model, global_model, test_x).softmax(1)

    def expert_accuracy(shares: torch.Tensor) -> float:
        """Accuracy on test_y of the target with per-image teacher weights proportional to `shares` (K, B)."""
        weights = shares / shares.sum(0).clamp_min(torch.finfo(shares.dtype).tiny)
        return target_agreement(test_logits, test_y, lambda _logits, _labels: weights)

    name = f"{run_dir.parent.name}-{run_dir.name}"
    grid(images, labels, info.num_classes, per_class, out / f"{name}-pool.png")
    return {
        "bench": "synthetic_images", "run": str(run_dir), "algorithm": cfg.server.algorithm,
        "version": int(state["version"]), "pool_images": len(labels),
        "pool_per_class": torch.bincount(labels, minlength=info.num_classes).tolist(),
        "teachers": len(teachers),
        "teacher_agreement": round(float((ensemble.argmax(1) == labels).float().mean()), 4),
        "mean_target_agreement": target_agreement(pool_logits, labels, None),
        "echo_target_agreement": target_agreement(pool_logits, labels, echo_weights),
        "test_mean_target_accuracy": target_agreement(test_logits, test_y, None),
        "test_echo_target_accuracy": target_agreement(test_logits, test_y, echo_weights),
        "test_expert_target_accuracy": expert_accuracy(teachers.proportions()[:, test_y]),
        "test_expert_target_accuracy_histogram": expert_accuracy(true_q[:, test_y]),
        "test_expert_by_global_accuracy": expert_accuracy((global_test @ teachers.proportions().T).T),
        "echo_weight_skew_correlation": weight_skew_correlation(pool_logits, labels, teachers.clients, histograms,
                                                                echo_weights),
        "global_agreement": round(float((global_logits.argmax(1) == labels).float().mean()), 4),
        "global_confidence": round(float(global_logits.softmax(1).max(1).values.mean()), 4),
        "global_test_accuracy": round(test_accuracy, 4),
        "pool_pixel_mean": round(float(images.mean()), 4), "pool_pixel_std": round(float(images.std()), 4),
        "real_pixel_mean": round(float(real.mean()), 4), "real_pixel_std": round(float(real.std()), 4),
        "pool_within_class_distance": round(within_class_distance(images, labels, info.num_classes), 3),
        "real_within_class_distance": round(within_class_distance(real, splits.train_y, info.num_classes), 3),
        "png": str(out / f"{name}-pool.png"),
        "synthesis_probes": [synthesis_probe(cfg, algorithm, info, teachers, n) for n in probe_steps],
        "label_prior_control": label_prior_control(teachers, info, images, labels, cfg.run.seed),
        "kd_probe": (kd_probe(cfg, algorithm, info, teachers, true_q, splits, make_model, global_model,
                              kd_steps, fresh_steps, ceiling_steps, ceiling_all_steps)
                     if kd_steps else None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories holding checkpoint.h5")
    parser.add_argument("--out", type=Path, default=Path("experiments/probes/images"), help="where PNGs go")
    parser.add_argument("--per-class", type=int, default=8, help="images per class in the grid")
    parser.add_argument("--synth-steps", default="", help="comma-separated fast-generator step counts to probe")
    parser.add_argument("--kd-probe", type=int, default=0, metavar="N",
                        help="KD iterations of the input-source probe (0: no probe)")
    parser.add_argument("--kd-probe-fresh", default="", metavar="N[,N...]",
                        help="with --kd-probe: also KD on fresh images made with N generator steps per call")
    parser.add_argument("--ceiling", type=int, default=0, metavar="STEPS",
                        help="with --kd-probe: also KD on images optimised directly against the teachers for "
                             "STEPS Adam steps (the ceiling test: all teachers, and class experts only)")
    parser.add_argument("--ceiling-all-steps", type=int, default=0, metavar="STEPS",
                        help="steps of the all-teachers variant (default: --ceiling's); it costs about the "
                             "teacher count times the class-expert variant per step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    steps = [int(n) for n in args.synth_steps.split(",") if n.strip()]
    for run_dir in args.runs:
        if not (run_dir / "checkpoint.h5").exists():
            raise SystemExit(f"{run_dir}: no checkpoint.h5 (not a finished run directory?)")
        fresh = [int(n) for n in args.kd_probe_fresh.split(",") if n.strip()]
        print(json.dumps(inspect(run_dir, args.out, args.per_class, steps, args.kd_probe, fresh, args.ceiling,
                                 args.ceiling_all_steps)), flush=True)


if __name__ == "__main__":
    main()
