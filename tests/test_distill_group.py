"""The distillation group (distill.ranks, distill/group.py): sums against one rank, ownership, launch checks."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mpi_afl.config import ConfigError, parse_args
from mpi_afl.distill.group import Group, Solo, drive
from mpi_afl.distill.proxy import ProbeProxy
from mpi_afl.distill.teachers import TeacherBuffer
from mpi_afl.models.flat import flat_size
from mpi_afl.run.group import check_group
from mpi_helpers import HANG_GUARD, MPIEXEC, env

HERE = Path(__file__).parent


@pytest.mark.mpi
@pytest.mark.slow
def test_group_sums_equal_the_one_rank_computation_within_rounding():
    """Under mpiexec -n 2: FedEcho's all-teacher logits, the generator's gradient and the student's KD gradient
    from two ranks with two teachers each, against one rank with all four (tests/group_equivalence.py).
    The bound is the probabilistic rounding bound of the sums whose order differs (tests/numerics.py): a
    teacher lost, counted twice or given the wrong batch changes them by O(1)."""
    done = subprocess.run([MPIEXEC, "-n", "2", sys.executable, str(HERE / "group_equivalence.py")],
                          capture_output=True, text=True, timeout=HANG_GUARD, env=env())
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [r["quantity"] for r in rows] == ["logits", "generator", "student"]
    for r in rows:
        assert r["rel_diff"] <= r["bound"], r


class FakeComm:
    """Size and rank only: enough for the ownership and row arithmetic (no messages)."""

    def __init__(self, size: int, rank: int):
        self.size, self.rank = size, rank

    def Get_size(self) -> int:
        return self.size

    def Get_rank(self) -> int:
        return self.rank


def make_buffer(capacity: int, group, distinct: bool = False) -> TeacherBuffer:
    from mpi_afl.models import build_model
    return TeacherBuffer(capacity, lambda: build_model("cnn", in_channels=1, image_size=8, num_classes=10, norm="stat"),
                         torch.device("cpu"), np.ones((20, 10)), ProbeProxy((1, 8, 8), 10, 4, 0.8),
                         proportions="uniform", distinct=distinct, generator=torch.Generator(), group=group)


def test_teachers_are_dealt_to_the_least_loaded_rank_and_shares_differ_by_at_most_one():
    size = 3
    for distinct in (False, True):
        buffer = make_buffer(8, Group(FakeComm(size, 0)), distinct)
        width = flat_size(buffer._ensemble.template)
        for n in range(40):
            buffer.push(n % 5 if distinct else n, 0, torch.zeros(width))
            counts = [buffer.owners.count(r) for r in range(size)]
            assert max(counts) - min(counts) <= 1, (n, buffer.owners)
        assert len(buffer) == (5 if distinct else 8)
        assert len(set(buffer.serials)) == len(buffer)


def test_a_member_keeps_only_its_own_models_and_a_new_group_size_deals_again():
    server = make_buffer(4, Group(FakeComm(2, 0)))
    member = make_buffer(4, Group(FakeComm(2, 1)))
    width = flat_size(server._ensemble.template)
    for n in range(6):
        server.push(n, n, torch.full((width,), float(n)))
    member.adopt(server.view(), server.new_models_for(1))
    assert server.new_models_for(1) == {}   # each model travels once
    mine = [i for i, o in enumerate(server.owners) if o == 1]
    assert member.ensemble().owned == mine and len(member.ensemble()) == len(mine)
    assert all((member.models[i] is None) == (i not in mine) for i in range(4))
    assert torch.equal(member.proportions(), server.proportions())
    # resumed with another group size: dealt out again in buffer order
    three = make_buffer(4, Group(FakeComm(3, 0)))
    three.load_state_dict(server.state_dict())
    assert three.owners == [0, 1, 2, 0] and three.clients == server.clients
    same = make_buffer(4, Group(FakeComm(2, 0)))
    same.load_state_dict(server.state_dict())
    assert same.owners == server.owners and same.serials == server.serials


def test_rows_split_a_batch_into_contiguous_shares():
    for size in (1, 2, 3, 4):
        for n in (1, 7, 320):
            shares = [Group(FakeComm(size, r)).rows(n) for r in range(size)]
            covered = [i for s in shares for i in range(n)[s]]
            assert covered == list(range(n))
    assert Solo().rows(5) == slice(0, 5)


def test_solo_reductions_return_their_inputs_without_yielding():
    t = torch.randn(3)
    work = Solo().reduce([t])
    assert drive(work)[0] is t


def config(*args: str):
    return parse_args(list(args))[0]


@pytest.mark.parametrize("args, size, words", [
    (["--algorithm", "fedrevive", "--distill.ranks=2"], 3, "leave no worker among 3 rank(s); allowed: 0..1"),
    (["--algorithm", "fedbuff", "--distill.ranks=1"], 4, "'fedbuff' does not distil"),
    (["--algorithm", "fedrevive", "--distill.ranks=8"], 17, "distill.teachers = 8 teachers"),
    (["--algorithm", "fedecho", "--echo.teachers=2", "--distill.ranks=2"], 8, "echo.teachers = 2 teachers"),
])
def test_launch_checks_name_distill_ranks(args, size, words):
    with pytest.raises(ConfigError) as e:
        check_group(config(*args), size)
    assert "config key 'distill.ranks'" in str(e.value) and words in str(e.value)


def test_launch_checks_accept_a_sensible_group():
    check_group(config("--algorithm", "fedrevive", "--distill.ranks=3"), 17)
    check_group(config("--algorithm", "fedbuff"), 1)


def test_batchnorm_students_are_refused_for_fedrevive():
    with pytest.raises(ConfigError, match="'distill.ranks'.*batchnorm"):
        config("--algorithm", "fedrevive", "--model.norm=batchnorm", "--distill.ranks=1")
    config("--algorithm", "fedecho", "--model.norm=batchnorm", "--distill.ranks=1")   # FedEcho keeps x''s stats
